"""Config of `experiments.invariant_path`: functionally invariant paths, continual and sparsity."""

from experiments import common


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (digits, 5 seeds); paper: wider sweeps."""
    c = common.base_config(arg)
    size = c.size
    c.dataset = "digits" if size != "paper" else "mnist1d"
    c.parts = ("continual", "sparsity")
    c.hidden = {"quick": (32,), "small": (64, 64), "paper": (128, 128)}[size]
    c.lr = 1e-3  # Adam: base training, fine-tuning and the CE baselines
    c.batch_size = 64
    c.base_steps = {"quick": 40, "small": 400, "paper": 1500}[size]  # task 1 / dense training

    # (a) continual: classes 0..K/2-1, then K/2..K-1, one head over all classes.
    c.continual_arms = {
        "quick": ("naive", "replay", "fip", "fip_jacobian", "penalty"),
        "small": ("naive", "replay", "fip", "fip_jacobian", "penalty"),
        "paper": ("naive", "replay", "fip", "fip_jacobian", "penalty", "ewc"),
    }[size]
    c.task2_steps = {"quick": 8, "small": 200, "paper": 500}[size]
    c.buffer_size = 50  # stored task-1 examples (the official code's 50 MNIST images)
    c.fip_lr = 0.05  # learning rate after the metric step (step length <= fip_lr * max_norm)
    c.max_norm = 1.0
    c.damping = 1e-2  # metric="fisher" (the library default, chosen by measurement)
    c.jacobian_damping = 1.0  # metric="jacobian": its metric is ~1000x larger (measured)
    c.tol = 1e-2
    c.maxiter = 100
    c.penalty_weight = 50.0  # x the mean distance = the official code's sum over 50 inputs
    c.ewc_weight = 1e4

    # (b) sparsity: a network trained on all classes, pruned to each level.
    c.sparsities = {
        "quick": (0.9,),
        "small": (0.8, 0.9, 0.95),
        "paper": (0.5, 0.8, 0.9, 0.95),
    }[size]
    c.claim_sparsity = 0.9
    c.path_steps = {"quick": 4, "small": 100, "paper": 300}[size]
    c.path_lr = 0.2
    c.anchor_batch = 64  # anchors per path step: a training batch
    c.ft_steps = {"quick": 4, "small": 100, "paper": 300}[size]
    return c

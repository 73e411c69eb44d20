"""Config of `experiments.invariant_path`: functionally invariant paths, continual and sparsity."""

from experiments.configs.base import base_config


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (digits); paper: wider sweeps."""
    c = base_config(arg)
    size = c.size
    c.dataset = "digits" if size != "paper" else "mnist1d"
    c.parts = ("continual", "sparsity") + (("robustness",) if size == "paper" else ())
    c.hidden = {"quick": (32,), "small": (64, 64), "paper": (128, 128)}[size]
    c.lr = 1e-3  # Adam: base training, fine-tuning and the CE baselines
    c.batch_size = 64
    c.base_steps = {"quick": 40, "small": 400, "paper": 1500}[size]  # task 1 / dense training

    # (a) continual: classes 0..K/2-1, then K/2..K-1, one head over all classes.
    c.continual_arms = ("naive", "replay", "fip", "fip_jacobian", "penalty")
    c.continual_arms += ("ewc",) if size == "paper" else ()
    c.task2_steps = {"quick": 8, "small": 200, "paper": 500}[size]
    c.buffer_size = 50  # stored task-1 examples (the official code's 50 MNIST images)
    # Both continual FIP arms rescale the solved direction to norm 1: every step moves
    # exactly fip_lr, so the Fisher and Euclidean metrics are compared at equal step length.
    c.fip_lr = 0.05
    c.max_norm = 1.0  # the path and robustness parts: step length <= path_lr * max_norm
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

    # (c) robustness (paper size): the dense network moved towards PGD robustness.
    c.robust_steps = {"quick": 4, "small": 100, "paper": 300}[size]
    c.robust_path_lr = 0.5
    c.robust_penalty_weight = 10.0
    c.eps = 0.1  # L-inf radius in standardised input units
    c.attack_steps = {"quick": 2, "small": 5, "paper": 5}[size]
    c.eval_attack_steps = {"quick": 3, "small": 20, "paper": 20}[size]
    return c

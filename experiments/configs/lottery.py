"""Config of `experiments.lottery`: IMP with rewinding, its controls, geometry per level."""

from experiments.configs.base import base_config


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (LeNet-300-100 on mnist1d, 8 levels to
    about 17% of the weights); paper: 15 levels, 2,000 steps, every arm (seeds: base_config)."""
    c = base_config(arg)
    size = c.size
    c.hidden = (300, 100)  # MLP widths; (300, 100) is LeNet-300-100
    c.optimizer = "sgd"  # sgd (momentum 0.9) | adam, on a cosine-decayed learning rate
    c.lr = 0.05
    c.steps = {"quick": 20, "small": 1000, "paper": 2000}[size]  # T, per level
    c.batch_size = {"quick": 32, "small": 128, "paper": 128}[size]
    c.levels = {"quick": 2, "small": 8, "paper": 15}[size]
    c.rate = 0.2  # fraction of the surviving weights pruned per level (Frankle & Carbin)
    c.head_rate = 0.1  # the output layer `head` (10% per round in the LTH paper)
    c.scope = "layerwise"  # layerwise (LTH, fully connected) | global (open_lth sparse_global)
    c.rewind_step = {"quick": 5, "small": 50, "paper": 100}[size]  # k of the ticket arms
    c.rewind = "fresh"  # fresh (open_lth: new optimizer, schedule at k) | restore
    c.arms = {
        "quick": "ticket,reinit,random",
        "small": "ticket,ticket_restore,reinit,random",
        "paper": "ticket,ticket_restore,ticket_init,reinit,random,oneshot",
    }[size]
    c.geometry_arms = {"quick": "ticket", "small": "ticket,reinit,random", "paper": c.arms}[size]
    # a second copy per level from the same start with another data order: the error barrier
    c.instability_arms = {"quick": "ticket", "small": "ticket", "paper": c.arms}[size]
    c.geometry_examples = {"quick": 64, "small": 500, "paper": 2000}[size]  # training examples
    c.lanczos_iters = {"quick": 3, "small": 20, "paper": 30}[size]
    c.trace_samples = {"quick": 2, "small": 20, "paper": 50}[size]
    c.path_points = {"quick": 3, "small": 11, "paper": 31}[size]  # Frankle et al.: 30 alphas
    c.match_margin = 0.01  # "matches dense": within 1 point of test accuracy
    return c

"""Config of `experiments.compose`: lottery tickets retrained with late-phase weights and by ULR."""

from experiments.configs.base import base_config


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (mnist1d); paper: larger (seeds:
    base_config)."""
    c = base_config(arg)
    size = c.size
    c.dataset = "digits" if size == "quick" else "mnist1d"  # digits saturates near 0.98
    c.hidden = {"quick": (32,), "small": (64, 64), "paper": (128, 128)}[size]
    c.batch_size = 64
    c.steps = {"quick": 30, "small": 1500, "paper": 4000}[size]  # dense run and every retraining
    c.lr = 2e-3  # Adam, every arm (backprop and ULR)
    # the ticket: one-shot global magnitude pruning of the trained dense kernels, rewound to init
    c.sparsity = 0.8
    c.head_sparsity = 0.4  # the output layer at half the rate (Frankle & Carbin 2019)
    # late-phase weights on the ticket (von Oswald et al. 2021): K members from late_start
    c.num_members = {"quick": 2, "small": 5, "paper": 10}[size]
    c.late_select = "rank1"  # the MLP has no BatchNorm: rank-1 (BatchEnsemble) members
    c.late_schedule = "cycle"  # Algorithm 1 (combine "sum", the official CIFAR code)
    c.late_start = 0.5  # fraction of the steps trained plainly before the members split
    c.late_noise = 0.0  # members' initial perturbation (0 in every official config)
    # ULR on the ticket (Jiang et al. 2024): forward passes only
    c.ulr_copies = 16
    c.ulr_sigma = 0.1
    c.ulr_baseline = "mean"
    c.ulr_antithetic = True
    c.margin = 0.02  # "within 2 points of accuracy" claims
    return c

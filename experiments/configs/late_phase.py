"""Config of `experiments.late_phase`: late-phase weights vs SGD on a BatchNorm ConvNet and on
the noisy quadratic problem (NQP). Imports nothing heavy: the arms are named here."""

from experiments.configs.base import base_config

PARTS = ("classify", "nqp")
# Arms, cheapest first (sizes take prefixes). Late arms train plainly to T0 = 60% of the steps,
# then with K members. sgd: plain training; late: the paper (member t mod K takes the whole
# minibatch, shared weights step once per K minibatches with the sum, as the official code);
# late_t0_0: the same from step 0 (equal minibatches, fewer shared-weight steps); late_random:
# a random member per step, shared weights every step; late_parallel: all K members per step
# on B/K-example slices; sgd_ghost_bn: its control, BatchNorm over B/K slices, no members;
# swa: cosine to swa_lr at T0, then constant, weights averaged, BatchNorm recomputed;
# late_swa: late-phase on the SWA schedule, per-member BatchNorm recomputed, then averaged.
CLASSIFY_ARMS = (
    "sgd", "late", "late_t0_0", "late_random", "late_parallel", "sgd_ghost_bn", "swa", "late_swa",
)  # fmt: skip
# NQP (plain SGD): late_mean: cycle with the mean of the K gradients (the ImageNet script's
# lr / K); sgd_lr_over_K: SGD whose lr drops to lr / K at T0 (the learning-rate confound).
NQP_ARMS = ("sgd", "late", "late_random", "late_mean", "sgd_lr_over_K", "late_parallel")


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo; paper: every arm, longer."""
    c = base_config(arg)
    size = c.size
    c.parts = PARTS

    # Classification: ConvNet (BatchNorm) on mnist1d, SGD + momentum 0.9 on a cosine schedule.
    c.model = {"quick": "mlp", "small": "convnet", "paper": "convnet"}[size]
    c.channels = {"quick": (), "small": (16, 32), "paper": (32, 64, 64)}[size]  # ConvNet blocks
    c.select = "bn_head"  # BatchNorm scale/shift + classifier: the paper's late-phase weights
    c.members = {"quick": 2, "small": 10, "paper": 10}[size]  # K (10 in every official config)
    c.t0_frac = 0.6  # T0 = 60% of the steps (official CIFAR configs: epoch 120 of 200)
    c.noise = 0.0  # members start identical (noise_std_init = 0 in every official config)
    c.member_opt_state = "fresh"  # new member optimizers at T0, as the official code
    # small/paper: the late phase (40% of the steps) gives each of K=10 members >= 100 minibatches
    c.steps = {"quick": 12, "small": 2500, "paper": 5000}[size]
    c.batch_size = {"quick": 8, "small": 50, "paper": 100}[size]
    c.lr = 0.05
    c.eval_every = {"quick": 6, "small": 500, "paper": 500}[size]
    c.swa_lr = 0.01  # constant learning rate of the SWA phase
    c.swa_every = {"quick": 2, "small": 10, "paper": 10}[size]
    c.classify_arms = CLASSIFY_ARMS[: {"quick": 3, "small": 5, "paper": None}[size]]

    # NQP: l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2, c ~ N(1, diag(h)), w = theta * gain.
    c.nqp_dim = {"quick": 10, "small": 50, "paper": 50}[size]
    c.nqp_steps = {"quick": 40, "small": 2000, "paper": 8000}[size]
    c.nqp_batch_size = 10
    c.nqp_lr = 0.2  # stable for every arm (cycle + sum steps theta with K x the gradient)
    c.nqp_eval_every = {"quick": 10, "small": 50, "paper": 100}[size]
    c.nqp_arms = NQP_ARMS[: {"quick": 3, "small": 5, "paper": None}[size]]
    return c

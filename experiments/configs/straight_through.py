"""Config of `experiments.straight_through`: estimators on an SBN with exact gradients; training."""

from experiments.configs.base import base_config


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small (the demo): the SBN comparison (ULR, principled ST,
    identity ST, REINFORCE) and principled vs identity ST with binary weights on digits; paper:
    a deeper SBN, more budgets, every activation estimator and the latent-weight arms."""
    c = base_config(arg)
    size = c.size
    c.dataset = "digits"  # the training part (b); the SBN part (a) is its own 2-D toy
    # (a) the SBN with exact gradients by enumeration
    c.sbn_hidden = {"quick": [2], "small": [5, 5], "paper": [5, 5, 5]}[size]
    c.sbn_points = {"quick": 4, "small": 32, "paper": 32}[size]
    c.sbn_estimators = ["ulr", "st", "identity", "reinforce"]
    c.sbn_budgets = {"quick": [2], "small": [2, 8, 32], "paper": [2, 4, 8, 16, 32, 64]}[size]
    c.sbn_repeats = {"quick": 4, "small": 32, "paper": 64}[size]
    c.sbn_train_evals = {"quick": 2, "small": 8, "paper": 8}[size]  # forward evals/example/step
    c.sbn_steps = {"quick": 2, "small": 200, "paper": 1000}[size]
    c.sbn_lr = 0.03  # Adam, every estimator
    c.sbn_evals = 1 if size == "quick" else 5  # exact-loss evaluations along training
    c.ulr_head_sigma = 0.5  # ULR's noise on the logits (hidden layers: the SBN's own noise)
    # (b) binary networks trained on config.dataset
    c.train_arms = {
        "quick": ["bin_st", "bin_identity"],
        "small": ["bin_st", "bin_identity"],
        "paper": [*(f"act_{e}" for e in ("st", "identity", "hardtanh", "tanh", "deterministic")),
                  "bin_st", "bin_identity", "bin_st_uniform", "bin_st_uniform_clip",
                  "bin_st_sgd_latent"],  # every arm of `experiments.straight_through.ARMS`
    }[size]  # fmt: skip
    c.hidden = {"quick": [8], "small": [64, 64], "paper": [256, 256]}[size]
    c.steps = {"quick": 4, "small": 400, "paper": 3000}[size]
    c.batch_size = {"quick": 32, "small": 64, "paper": 100}[size]
    c.lr = 3e-3  # Adam on the real parameters (gains, biases, head)
    # mirror descent (optax.sgd) on the latent weights; 100 was the best of {10, 30, 100, 300}
    # for bin_st on digits, seed 0 (one-seed check; identity ST got the same value)
    c.latent_lr = 100.0  # also the step of bin_st_sgd_latent (it changes only the 2F' factor)
    c.eval_samples = {"quick": 2, "small": 16, "paper": 32}[size]  # S of the mean-of-samples net
    return c

"""Config of `experiments.likelihood_ratio`: ULR gradient quality, training and robustness.

Imports nothing heavy: the gradient-quality variants are named here."""

from experiments.configs.base import base_config

# Gradient-quality variants: name -> options of `likelihood_ratio.ulr` (None: ES).
QUALITY_VARIANTS: dict[str, dict | None] = {
    "none": {}, "mean": {"baseline": "mean"}, "clean": {"baseline": "clean"},
    "antithetic+mean": {"antithetic": True, "baseline": "mean"},
    "layerwise+clean": {"layerwise": True, "baseline": "clean"}, "qmc": {"qmc": True}, "es": None,
}  # fmt: skip


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (digits); paper: wider sweeps."""
    c = base_config(arg)
    size = c.size
    c.dataset = "digits"
    c.hidden = {"quick": (32,), "small": (128,), "paper": (128, 128)}[size]
    c.steps = {"quick": 30, "small": 600, "paper": 2000}[size]
    c.batch_size = 64
    c.lr = 3e-3  # Adam, every arm
    c.eval_every = {"quick": 15, "small": 150, "paper": 250}[size]
    c.copies = {"quick": 4, "small": 16, "paper": 16}[size]  # N of ULR and ES in training
    c.baseline = "mean"  # ULR's baseline in training: leave-one-out, no extra pass
    # Noise settings "family:sigma", each an arm pair (ULR, backprop + the same noise).
    c.noise_settings = {
        "quick": ("laplace:1.0",),
        "small": ("gaussian:0.1", "laplace:1.0"),
        "paper": ("gaussian:0.1", "gaussian:0.5", "laplace:0.3", "laplace:1.0"),
    }[size]
    c.es_sigma = 0.01
    c.fgsm_eps = {"quick": (0.3,), "small": (0.1, 0.3), "paper": (0.05, 0.1, 0.2, 0.3, 0.5)}[size]
    c.claim_eps = c.fgsm_eps if size != "paper" else (0.1, 0.3)  # budgets judged in claims
    c.source_seed_offset = 1000  # transfer attacks: crafted on backprop trained with seed+offset
    # Gradient quality (one batch at initialisation, against jax.grad): cosine, bias vs N.
    c.quality_variants = {
        "quick": ("mean", "es"),
        "small": ("mean", "layerwise+clean", "es"),
        "paper": ("none", "mean", "clean", "antithetic+mean", "layerwise+clean", "qmc", "es"),
    }[size]
    c.quality_copies = {"quick": (4,), "small": (4, 16, 64), "paper": (4, 16, 64, 256)}[size]
    c.quality_repeats = {"quick": 2, "small": 16, "paper": 64}[size]
    c.quality_sigma = 0.1
    return c

"""Config of `experiments.train`: plain supervised training, the baseline of every method."""

from experiments.configs.base import base_config


def get_config(arg: str = "small"):
    """quick: a smoke run in seconds; small: the demo (ConvNet, mnist1d); paper: 5,000 steps."""
    c = base_config(arg)
    c.num_seeds = 1
    c.model = "convnet"
    c.dtype = "float32"  # computation dtype: float32 | bfloat16 (params stay float32)
    c.seed_loop = "vmap"  # how a step covers the seeds: vmap | map | unroll (convs on CPU)
    c.optimizer = "sgd"  # sgd (momentum 0.9) | adam, on a cosine-decayed learning rate
    c.lr = 0.05
    c.steps = {"quick": 30, "small": 2000, "paper": 5000}[c.size]
    c.batch_size = {"quick": 32, "small": 128, "paper": 128}[c.size]
    c.eval_every = {"quick": 15, "small": 200, "paper": 500}[c.size]
    return c

"""Eight simulated CPU devices for the multi-device tests; must run before JAX starts."""

import os

from tests.helpers import FAST_COMPILE_FLAGS

# Tests are dominated by XLA compile time; unoptimised CPU code runs tiny shapes fast enough.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 "
    + FAST_COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ground truths compare at full float32 precision on every backend (GPU matmuls default to TF32).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("MPLBACKEND", "Agg")

import wspace  # noqa: E402  (after the flags above)

# A second `make test` loads compiled programs from disk (WSPACE_COMPILATION_CACHE=0: off).
wspace.training.enable_compilation_cache()

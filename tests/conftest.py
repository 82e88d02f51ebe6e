"""Test-session setup.

- Eight virtual CPU devices for the sharding tests: XLA reads this flag once, when jax
  first initialises its backends, so it is set here before any test imports jax.
- JAX's strict settings, as JAX's own tests run: no implicit rank promotion, no implicit
  dtype promotion. The library must work under both.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests compare float32 results at ~1e-5: keep matmuls in full float32 on GPUs too
# (recent NVIDIA GPUs default to TF32). No effect on the CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_NUMPY_DTYPE_PROMOTION", "strict")

"""Test set-up shared by every test module and doctest.

Eight fake CPU devices, so that ``jax.pmap`` and sharded ``jax.jit`` are
tested on any machine. The flag must be set before jax is first imported,
which is why it lives in the root conftest, read before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

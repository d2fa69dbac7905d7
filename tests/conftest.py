"""Shared pytest setup: tests run on CPU; x64 is switched on only inside the `x64` fixture."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' shapes are tiny, so compiling dominates their time. XLA:CPU's backend (LLVM)
# optimization level 0 cut the routed-VGG equivalence test from 53 to 30 s; it makes slower
# kernels that agree with optimized ones within every test's tolerance. Subprocesses inherit
# it (tests/test_sharding.py passes it on); benchmarks and the tr-jax CLI do not set it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from tr_jax import cpu_runtime  # noqa: E402

cpu_runtime.configure()   # as the tr-jax command line does: faster XLA:CPU steps


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (``jax.enable_x64``), off again afterwards."""
    with jax.enable_x64(True):
        yield

"""Shared pytest setup: tests run on CPU; x64 is switched on only inside `x64` contexts."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tr_jax import cpu_runtime  # noqa: E402

cpu_runtime.configure()   # as the tr-jax command line does: faster XLA:CPU steps

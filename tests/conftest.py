"""Shared pytest setup: tests run on CPU; x64 is switched on only inside `x64` contexts."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

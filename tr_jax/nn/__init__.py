"""Neural-network layers shared by all tr_jax models."""
from tr_jax.nn.conv import Conv

__all__ = ["Conv"]

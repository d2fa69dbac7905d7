"""Neural-network layers shared by all tr_jax models, with backend-aware lowerings."""
from tr_jax.nn.conv import Conv, conv2d
from tr_jax.nn.norm import BatchNorm
from tr_jax.nn.pool import max_pool

__all__ = ["BatchNorm", "Conv", "conv2d", "max_pool"]

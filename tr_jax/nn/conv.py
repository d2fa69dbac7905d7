"""2-D convolution used by every tr_jax model.

Parameter names and shapes match ``flax.linen.Conv`` (``kernel`` (kh, kw, Cin, Cout) in HWIO,
``bias`` (Cout,)), so checkpoints and per-task gradient code see the same tree whichever
lowering runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv(nn.Module):
    """NHWC convolution with ``flax.linen.Conv``'s parameters.

    Attributes:
      features: output channels Cout.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: ``"SAME"``, ``"VALID"`` or explicit ((lo, hi), (lo, hi)).
      use_bias: adds a (Cout,) bias.
      dtype: computation dtype (None: from inputs and params).
      param_dtype: parameter dtype.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, Cin) -> (B, H', W', Cout)."""
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=tuple(self.strides), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias

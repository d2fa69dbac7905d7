"""Batch normalization in a folded form that XLA fuses into fewer, cheaper passes.

:class:`BatchNorm` is a drop-in for ``flax.linen.BatchNorm`` over the last (feature) axis:
the same variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), the
same statistics (float32 or wider; variance ``E[x^2] - E[x]^2`` clipped at 0, flax's default
``use_fast_variance``) and the same running-average update. Only the normalization is written
differently: flax computes ``(x - mean) * (rsqrt(var + eps) * scale) + bias``; here the
per-feature factors are folded first, ``y = x * a + b`` with ``a = rsqrt(var + eps) * scale``
and ``b = bias - mean * a``, and the per-feature sums are taken over ``x`` viewed as
(B * H * W, C). Autodiff of this form gives one elementwise pass and two column sums in the
backward, where flax's form materializes ``x - mean`` and more elementwise intermediates; a
BatchNorm forward + backward on (64, 64, 64, 64) float32 takes about half as long on XLA:CPU
(``benchmarks/results/perf_notes.md``). It is plain JAX (no custom derivative rules), so
``jvp``, ``vjp``, ``vmap`` and higher derivatives all work, on every backend.

Results equal flax's up to float rounding: the folded form adds a rounding error of order
``eps_float * |mean| / std`` relative to the output, smaller than the ``eps_float * (mean /
std)^2`` that the fast variance already has.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and (biased, clipped) variance of x (..., C), in float32 or wider.

    Returns:
      (mean (C,), var (C,)), ``var = max(0, E[x^2] - E[x]^2)`` as in ``flax.linen.BatchNorm``.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rows = x.reshape(-1, x.shape[-1])
    mean = rows.mean(axis=0)
    var = jnp.maximum(0.0, (rows * rows).mean(axis=0) - mean * mean)
    return mean, var


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array | None,
              bias: jax.Array | None, epsilon: float, dtype: Any = None) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` over the last axis, folded.

    Args:
      x: (..., C).
      mean, var: (C,) statistics (float32 or wider).
      scale, bias: (C,) or None (no scale / no bias).
      epsilon: added to the variance.
      dtype: result dtype (None: promoted from x, scale and bias, as in flax).

    Returns:
      an array shaped like x.
    """
    # rsqrt in the statistics' dtype (as flax), the folding in the widest dtype involved, so
    # that float64 inputs with float32 running statistics keep float64 precision.
    compute_dtype = jnp.result_type(x, mean, var)
    a = lax.rsqrt(var + epsilon).astype(compute_dtype)
    if scale is not None:
        a = a * scale
    b = -mean.astype(compute_dtype) * a
    if bias is not None:
        b = b + bias
    args = [arg for arg in (x, scale, bias) if arg is not None]
    out_dtype = nn.dtypes.canonicalize_dtype(*args, dtype=dtype)
    return jnp.asarray(x * a + b, out_dtype)


class BatchNorm(nn.Module):
    """Batch normalization over the last axis; variables and semantics of
    ``flax.linen.BatchNorm`` (see the module docstring).

    Attributes:
      use_running_average: normalize with the running statistics (inference) instead of the
        batch's.
      momentum: running-average decay.
      epsilon: added to the variance.
      dtype: result dtype (None: promoted from inputs and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias.
      use_scale: learn a scale.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., C) -> normalized x (..., C)."""
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = batch_moments(x)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        scale = (self.param("scale", nn.initializers.ones, features, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", nn.initializers.zeros, features, self.param_dtype)
                if self.use_bias else None)
        return normalize(x, mean, var, scale, bias, self.epsilon, self.dtype)

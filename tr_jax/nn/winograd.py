"""3x3 stride-1 convolution with a Winograd F(2x2, 3x3) forward and direct-convolution
derivatives.

The output is computed in 2x2 tiles, each from a 4x4 input tile:
``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). The transforms are additions and halvings; the products become 16 independent
(tiles, Cin) x (Cin, Cout) matrix products: 16 multiply-adds per 2x2 output tile and channel pair
instead of 36. On XLA:CPU this forward is 25-40 % faster than ``lax.conv_general_dilated`` on
8x8 maps (the VGG layers with 128-512 channels), but autodiff *of* the transforms is slower than
XLA's own convolution derivatives. So :func:`winograd_conv` is a ``custom_jvp`` function: the
value comes from F(2x2, 3x3), the tangent from direct convolutions
``conv(dx, k) + conv(x, dk)``. Reverse mode transposes those into exactly the input- and
weight-gradient convolutions that plain autodiff of ``lax.conv_general_dilated`` runs;
forward mode, ``vmap`` and nested derivatives work as for any JAX function.

Values equal the direct convolution up to float rounding (about 1e-6 relative in float32, a
few times the direct convolution's own rounding; the transform constants are exact in binary).
Measurements: ``benchmarks/results/perf_notes.md``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Pads = tuple[tuple[int, int], tuple[int, int]]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# F(2x2, 3x3) transforms: the rows of Bᵀ, G and Aᵀ.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(terms: Sequence[jax.Array], coefs: Sequence[float]) -> jax.Array:
    """sum_k coefs[k] * terms[k], skipping zero coefficients and multiplications by +-1."""
    out = None
    for c, t in zip(coefs, terms):
        if c == 0:
            continue
        v = t if c == 1 else (-t if c == -1 else c * t)
        out = v if out is None else out + v
    return out


def _strided_taps(a: jax.Array, axis: int, count: int) -> list[jax.Array]:
    """``[a[k::2][:count] for k in range(4)]`` along ``axis``: the 4 rows (or columns) of
    every input tile."""
    return [lax.slice_in_dim(a, k, k + 2 * (count - 1) + 1, 2, axis) for k in range(4)]


def winograd_forward(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """The F(2x2, 3x3) computation (plain JAX; see :func:`winograd_conv` for the public one).

    Args:
      x: (B, H, W, Cin).
      kernel: (3, 3, Cin, Cout), HWIO.
      pads: explicit zero padding ((top, bottom), (left, right)).

    Returns:
      (B, H', W', Cout) with H' = H + top + bottom - 2, W' likewise.
    """
    b, h, w, cin = x.shape
    cout = kernel.shape[-1]
    ho, wo = h + sum(pads[0]) - 2, w + sum(pads[1]) - 2
    th, tw = -(-ho // 2), -(-wo // 2)  # output tiles; an odd side computes one extra row
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pads[0][0], pads[0][1] + 2 * th - ho, 0),
                  (pads[1][0], pads[1][1] + 2 * tw - wo, 0), (0, 0, 0)))
    # Input transform Bᵀ d B, rows then columns: 16 arrays (B, th, tw, Cin).
    rows = [_combine(_strided_taps(xp, 1, th), _BT[a]) for a in range(4)]
    v = [_combine(_strided_taps(r, 2, tw), _BT[c]) for r in rows for c in range(4)]
    v = jnp.stack(v).reshape(16, b * th * tw, cin)
    # Kernel transform G g Gᵀ: (16, Cin, Cout).
    g_rows = [_combine([kernel[i] for i in range(3)], _G[a]) for a in range(4)]
    u = jnp.stack([_combine([g[j] for j in range(3)], _G[c]) for g in g_rows for c in range(4)])
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, b, th, tw, cout)
    # Output transform Aᵀ m A: the 2x2 outputs of every tile, interleaved back into the map.
    cols = [[_combine([m[a, c] for c in range(4)], _AT[s]) for s in range(2)] for a in range(4)]
    y = jnp.stack([jnp.stack([_combine([cols[a][s] for a in range(4)], _AT[r])
                              for s in range(2)], axis=3) for r in range(2)], axis=2)
    return y.reshape(b, 2 * th, 2 * tw, cout)[:, :ho, :wo]


def _direct(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _winograd_conv(x, kernel, pads):
    return winograd_forward(x, kernel, pads)


def _winograd_conv_jvp(pads, primals, tangents):
    (x, kernel), (dx, dk) = primals, tangents
    y = _winograd_conv(x, kernel, pads)
    terms = [_direct(a, b, pads) for a, b, t in ((dx, kernel, dx), (x, dk, dk))
             if not isinstance(t, SymbolicZero)]
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_winograd_conv.defjvp(_winograd_conv_jvp, symbolic_zeros=True)


def winograd_conv(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """3x3 stride-1 NHWC / HWIO convolution: F(2x2, 3x3) value, direct-convolution derivatives.

    Args:
      x: (B, H, W, Cin).
      kernel: (3, 3, Cin, Cout).
      pads: explicit zero padding ((top, bottom), (left, right)); the padded map must be at
        least 3x3.

    Returns:
      (B, H', W', Cout), H' = H + top + bottom - 2 (likewise W'), equal to
      ``lax.conv_general_dilated`` up to float rounding.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv needs a 3x3 kernel; got {kernel.shape[:2]}.")
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads)]
    if min(padded) < 3:
        raise ValueError(f"winograd_conv: the padded map {tuple(padded)} is smaller than the "
                         "3x3 kernel; pad more, e.g. padding='SAME' in conv2d.")
    return _winograd_conv(x, kernel, pads)

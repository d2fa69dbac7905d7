"""3x3 stride-1 convolution by Winograd's F(2x2, 3x3): the value, the input gradient and the
kernel gradient.

The output is computed in 2x2 tiles, each from a 4x4 input tile:
``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). The transforms are additions and halvings; the products become 16 independent
(tiles, Cin) x (Cin, Cout) matrix products: 16 multiply-adds per 2x2 output tile and channel pair
instead of 36.

:func:`winograd_conv` is a ``custom_jvp`` function whose tangent is ``L(dx) + K(dk)``, both
written as linear transposes (``jax.linear_transpose``) of F(2x2, 3x3) computations, so that
reverse mode transposes them back into those:

* ``L`` is the transpose of :func:`input_gradient`, the output cotangent convolved with the
  spatially flipped kernel, input and output channels swapped: the input gradient costs what
  the forward costs.
* ``K`` is the transpose of :func:`kernel_gradient`: the forward's input tiles against the
  cotangent's tiles spread by the output transform's transpose, in 16 (Cin, tiles) x
  (tiles, Cout) products. (Autodiff *through* the forward's transforms gave the same math with
  a slower layout.)

Forward mode evaluates ``L`` and ``K`` themselves (the transposed transforms). Against the
previous version, whose kernel tangent was a direct convolution, a JVP of value and both
tangents is 13 % slower on a 4x4 map and 6-11 % faster on 8x8 and 16x16 maps; making ``L``
Winograd had cost 5-22 % against direct tangents for both. ``vmap`` and nested derivatives
work as for any JAX function. Values and derivatives equal the direct convolution's up to
float rounding (about 1e-6 relative in float32, a few times the direct convolution's own
rounding; the transform constants are exact in binary). In bfloat16 the value and the
gradients round 2-3x worse than the direct convolution, which is why ``conv2d``'s ``"auto"``
never picks this for it. Measurements: ``benchmarks/results/perf_notes.md`` (sections 2, 10
and 11).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

Pads = tuple[tuple[int, int], tuple[int, int]]
# F(2x2, 3x3) transforms: the rows of Bᵀ, G and Aᵀ.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# A y Aᵀ for a 2x2 tile y: entry (4 a + c, r, s) = Aᵀ[r][a] Aᵀ[s][c].
_SPREAD = np.einsum("ra,sc->acrs", np.array(_AT), np.array(_AT)).reshape(16, 2, 2)


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


def kernel_transform(kernel: jax.Array, flip: bool = False) -> jax.Array:
    """G g Gᵀ for every channel pair: (3, 3, Cin, Cout) -> (16, Cin, Cout), tile entry
    (a, c) at index 4 a + c; with ``flip``, of the kernel reversed in both spatial axes."""
    taps = (2, 1, 0) if flip else (0, 1, 2)
    g_rows = [_combine([kernel[i] for i in taps], _G[a]) for a in range(4)]
    return jnp.stack([_combine([g[j] for j in taps], _G[c]) for g in g_rows for c in range(4)])


def _kernel_transform_transpose(u: jax.Array) -> jax.Array:
    """Gᵀ u G, the transpose of :func:`kernel_transform` (unflipped): (16, Cin, Cout) ->
    (3, 3, Cin, Cout). Written out: ``jax.linear_transpose(kernel_transform, ...)`` gives the
    same values, but made value + gradients of the 4x4 layers 17-22 % slower on XLA:CPU."""
    u = u.reshape(4, 4, *u.shape[1:])
    rows = [_combine([u[a] for a in range(4)], [_G[a][i] for a in range(4)]) for i in range(3)]
    return jnp.stack([jnp.stack([_combine([r[c] for c in range(4)], [_G[c][j] for c in range(4)])
                                 for j in range(3)]) for r in rows])


def _tiling(hw: tuple[int, int], pads: Pads) -> tuple[int, int, int, int]:
    """(H', W', th, tw): the output map of a 3x3 kernel over ``hw`` padded by ``pads``, and
    its number of 2x2 tiles per side (an odd side computes one extra row or column)."""
    ho, wo = hw[0] + sum(pads[0]) - 2, hw[1] + sum(pads[1]) - 2
    return ho, wo, -(-ho // 2), -(-wo // 2)


def _input_tiles(x: jax.Array, pads: Pads) -> jax.Array:
    """Bᵀ d B of every 4x4 input tile: (B, H, W, Cin) -> (16, B * th * tw, Cin)."""
    b, _, _, cin = x.shape
    ho, wo, th, tw = _tiling(x.shape[1:3], pads)
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pads[0][0], pads[0][1] + 2 * th - ho, 0),
                  (pads[1][0], pads[1][1] + 2 * tw - wo, 0), (0, 0, 0)))
    rows = [_combine(_strided_taps(xp, 1, th), _BT[a]) for a in range(4)]
    v = [_combine(_strided_taps(r, 2, tw), _BT[c]) for r in rows for c in range(4)]
    return jnp.stack(v).reshape(16, b * th * tw, cin)


def _tiled_conv(x: jax.Array, u: jax.Array, pads: Pads, u_in_axis: int) -> jax.Array:
    """F(2x2, 3x3) of ``x`` (B, H, W, Cin) with a transformed kernel ``u`` (16, ., .) whose
    input-channel axis is ``u_in_axis`` (1 or 2; the other is Cout). ``pads`` may be negative
    (cropping). Returns (B, H', W', Cout), H' = H + top + bottom - 2 (likewise W')."""
    b, cout = x.shape[0], u.shape[3 - u_in_axis]
    ho, wo, th, tw = _tiling(x.shape[1:3], pads)
    m = lax.dot_general(_input_tiles(x, pads), u, (((2,), (u_in_axis,)), ((0,), (0,))))
    m = m.reshape(4, 4, b, th, tw, cout)
    # Output transform Aᵀ m A: the 2x2 outputs of every tile, interleaved back into the map.
    cols = [[_combine([m[a, c] for c in range(4)], _AT[s]) for s in range(2)] for a in range(4)]
    y = jnp.stack([jnp.stack([_combine([cols[a][s] for a in range(4)], _AT[r])
                              for s in range(2)], axis=3) for r in range(2)], axis=2)
    return y.reshape(b, 2 * th, 2 * tw, cout)[:, :ho, :wo]


def winograd_forward(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """The F(2x2, 3x3) computation (plain JAX; see :func:`winograd_conv` for the public one).

    Args:
      x: (B, H, W, Cin).
      kernel: (3, 3, Cin, Cout), HWIO.
      pads: explicit zero padding ((top, bottom), (left, right)).

    Returns:
      (B, H', W', Cout) with H' = H + top + bottom - 2, W' likewise.
    """
    return _tiled_conv(x, kernel_transform(kernel), pads, u_in_axis=1)


def input_gradient(cotangent: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """The gradient of ``sum(conv(x, kernel) * cotangent)`` in ``x``, by F(2x2, 3x3).

    It is the convolution of the cotangent with the kernel flipped in space and with its
    channel axes swapped, padded ``(2 - lo, 2 - hi)`` on each axis (negative: cropped).

    Args:
      cotangent: (B, H', W', Cout), the convolution's output shape.
      kernel: (3, 3, Cin, Cout).
      pads: the forward convolution's padding ((top, bottom), (left, right)).

    Returns:
      (B, H, W, Cin).
    """
    # The channel swap is the products' contraction axis: transposing the kernel itself
    # (fused into its transform) made XLA:CPU's products 2-5x slower.
    return _tiled_conv(cotangent, kernel_transform(kernel, flip=True),
                       tuple((2 - lo, 2 - hi) for lo, hi in pads), u_in_axis=2)


def kernel_gradient(x: jax.Array, cotangent: jax.Array, pads: Pads) -> jax.Array:
    """The gradient of ``sum(conv(x, kernel) * cotangent)`` in ``kernel``, by F(2x2, 3x3).

    ``Gᵀ [Σ_tiles (Bᵀ d B) ⊗ (A dy Aᵀ)] G``: the input tiles (as in the forward) and the
    cotangent's 2x2 tiles spread to 4x4 by the output transform's transpose meet in 16
    (Cin, tiles) x (tiles, Cout) products, 16 multiply-adds per 2x2 output tile and channel
    pair instead of the direct weight gradient's 36.

    Args:
      x: (B, H, W, Cin), the convolution's input.
      cotangent: (B, H', W', Cout), the convolution's output shape.
      pads: the convolution's padding ((top, bottom), (left, right)).

    Returns:
      (3, 3, Cin, Cout).
    """
    b, ho, wo, cout = cotangent.shape
    _, _, th, tw = _tiling(x.shape[1:3], pads)
    dy = lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                 ((0, 0, 0), (0, 2 * th - ho, 0), (0, 2 * tw - wo, 0), (0, 0, 0)))
    # A dy Aᵀ, the transpose of the forward's output transform, as one product over each
    # tile's 2x2 entries: written with additions, XLA:CPU fused the cotangent's producer
    # (e.g. the BatchNorm backward) into each of the 16 results and ran it 16 times.
    m = lax.dot_general(_SPREAD.astype(dy.dtype), dy.reshape(b, th, 2, tw, 2, cout),
                        (((1, 2), (2, 4)), ((), ())))
    m = m.reshape(16, b * th * tw, cout)
    u = lax.dot_general(_input_tiles(x, pads), m, (((1,), (1,)), ((0,), (0,))))
    return _kernel_transform_transpose(u)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _winograd_conv(x, kernel, pads):
    return winograd_forward(x, kernel, pads)


def _winograd_conv_jvp(pads, primals, tangents):
    (x, kernel), (dx, dk) = primals, tangents
    y = _winograd_conv(x, kernel, pads)
    cotangent = jax.ShapeDtypeStruct(y.shape, y.dtype)
    # Each term is the transpose of a gradient; reverse mode turns it back into that gradient.
    gradients = ((dx, functools.partial(input_gradient, kernel=kernel, pads=pads)),
                 (dk, functools.partial(kernel_gradient, x, pads=pads)))
    terms = [jax.linear_transpose(gradient, cotangent)(t)[0] for t, gradient in gradients
             if not isinstance(t, SymbolicZero)]
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_winograd_conv.defjvp(_winograd_conv_jvp, symbolic_zeros=True)


def winograd_conv(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """3x3 stride-1 NHWC / HWIO convolution: F(2x2, 3x3) value and gradients (see the module
    docstring).

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

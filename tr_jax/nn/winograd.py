"""3x3 stride-1 convolution by Winograd's F(2x2, 3x3) or F(4x4, 3x3): the value, the input
gradient and the kernel gradient.

The output is computed in m x m tiles (m = 2 or 4, the ``tile``), each from an (m + 2) x (m + 2)
input tile: ``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). The input and kernel transforms are additions and
scalings; the products become (m + 2)² independent (tiles, Cin) x (Cin, Cout) matrix products:
per output position and channel pair, 4 multiply-adds with F(2x2, 3x3) and 2.25 with
F(4x4, 3x3), against the direct convolution's 9. By default (:func:`default_tile`) maps under
8x8 use F(2x2, 3x3), which was faster there.

:func:`winograd_conv` is a ``custom_jvp`` function whose tangent is ``L(dx) + K(dk)``, both
written as linear transposes (``jax.linear_transpose``) of Winograd computations, so that
reverse mode transposes them back into those:

* ``L`` is the transpose of :func:`input_gradient`, the output cotangent convolved with the
  spatially flipped kernel, input and output channels swapped: the input gradient costs what
  the forward costs.
* ``K`` is the transpose of :func:`kernel_gradient`: the forward's input tiles against the
  cotangent's tiles spread by the output transform's transpose, in (m + 2)² (Cin, tiles) x
  (tiles, Cout) products. (Autodiff *through* the forward's transforms gave the same math with
  a slower layout.)

Forward mode evaluates ``L`` and ``K`` themselves (the transposed transforms). With F(2x2, 3x3),
against a version whose kernel tangent was a direct convolution, a JVP of value and both
tangents was 13 % slower on a 4x4 map and 6-11 % faster on 8x8 and 16x16 maps. Forward mode with
F(4x4, 3x3) is slow (known problem, 2026-11-27, AVX2, batch 32, ms, winograd / xla): a JVP of
value and both tangents took 147 / 16 on 16x16 64->64 and 111 / 16 on 8x8 128->128 (the
kernel tangent alone 20 / 10 and 40 / 11; F(2x2, 3x3) on 4x4 256->256: 25 / 21), and the
sketched affinity, which is forward mode, ran ~9x slower than with ``"xla"``; so the
estimators trace their JVPs in :func:`tr_jax.nn.conv.skip_winograd`, where ``"auto"``
skips this lowering. ``vmap`` and nested derivatives work as for any JAX function.
Values and derivatives equal the direct convolution's up to float rounding: in float32, up to
5e-7 of the output's largest entry with F(2x2, 3x3), whose transform constants are exact in
binary, and up to 4e-6 with F(4x4, 3x3), whose kernel transform has 1/6 and 1/24. In bfloat16
the value and the gradients round 2-3x worse than the direct convolution with F(2x2, 3x3)
(F(4x4, 3x3) not measured), which is why ``conv2d``'s ``"auto"`` never picks this for it.
Measurements: ``benchmarks/results/perf_notes.md`` (sections 2, 10, 11 and 12).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

Pads = tuple[tuple[int, int], tuple[int, int]]
# default_tile: F(4x4, 3x3) where the output map is at least this on both sides.
TILE4_MIN_SIDE = 8


class _Transforms(NamedTuple):
    """F(m x m, 3x3): the rows of Bᵀ ((m + 2) x (m + 2)), G ((m + 2) x 3) and Aᵀ
    (m x (m + 2)), and ``spread``, A y Aᵀ for an m x m tile y as a ((m + 2)², m, m) matrix:
    entry ((m + 2) a + c, r, s) = Aᵀ[r][a] Aᵀ[s][c]."""

    bt: tuple[tuple[float, ...], ...]
    g: tuple[tuple[float, ...], ...]
    at: tuple[tuple[float, ...], ...]
    spread: np.ndarray

    @property
    def m(self) -> int:
        """Output tile side."""
        return len(self.at)

    @property
    def n(self) -> int:
        """Input tile side, m + 2."""
        return len(self.bt)


def _transforms(bt, g, at) -> _Transforms:
    """The :class:`_Transforms` of F(m x m, 3x3) from its matrices' rows (spread computed)."""
    at_np = np.array(at, np.float64)
    spread = np.einsum("ra,sc->acrs", at_np, at_np).reshape(len(bt) ** 2, len(at), len(at))
    return _Transforms(bt, g, at, spread)


# Lavin & Gray's matrices, interpolation points 0, 1, -1 (and 2, -2 for m = 4) and infinity.
_TRANSFORMS = {
    2: _transforms(bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                   g=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
                   at=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: _transforms(bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
                   g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
                   at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
                       (0, 1, -1, 8, -8, 1))),
}
TILES = tuple(_TRANSFORMS)


def default_tile(out_hw: Sequence[int]) -> int:
    """The output tile side :func:`winograd_conv` uses for an (H', W') output: 4 when both
    sides are at least :data:`TILE4_MIN_SIDE`, else 2. On XLA:CPU (value + both gradients of
    VGG-11's and TAG's layers) F(4x4, 3x3) was 8-31 % faster than F(2x2, 3x3) on 8x8 to 32x32
    maps, except 8x8 128->256 (12 % slower), and slower on 4x4 maps, whose single tile per
    image leaves the products only the batch as rows (perf_notes.md section 12)."""
    return 4 if min(out_hw) >= TILE4_MIN_SIDE else 2


def _combine(terms: Sequence[jax.Array], coefs: Sequence[float]) -> jax.Array:
    """sum_k coefs[k] * terms[k], skipping zero coefficients and multiplications by +-1."""
    out = None
    for c, t in zip(coefs, terms):
        if c == 0:
            continue
        v = t if c == 1 else (-t if c == -1 else c * t)
        out = v if out is None else out + v
    return out


def _strided_taps(a: jax.Array, axis: int, count: int, t: _Transforms) -> list[jax.Array]:
    """``[a[k::m][:count] for k in range(m + 2)]`` along ``axis``: the m + 2 rows (or columns)
    of every input tile."""
    return [lax.slice_in_dim(a, k, k + t.m * (count - 1) + 1, t.m, axis) for k in range(t.n)]


def kernel_transform(kernel: jax.Array, tile: int = 2, flip: bool = False) -> jax.Array:
    """G g Gᵀ for every channel pair: (3, 3, Cin, Cout) -> ((m + 2)², Cin, Cout), tile entry
    (a, c) at index (m + 2) a + c, m = ``tile``; with ``flip``, of the kernel reversed in both
    spatial axes."""
    t = _TRANSFORMS[tile]
    taps = (2, 1, 0) if flip else (0, 1, 2)
    g_rows = [_combine([kernel[i] for i in taps], t.g[a]) for a in range(t.n)]
    return jnp.stack([_combine([g[j] for j in taps], t.g[c]) for g in g_rows
                      for c in range(t.n)])


def _kernel_transform_transpose(u: jax.Array, t: _Transforms) -> jax.Array:
    """Gᵀ u G, the transpose of :func:`kernel_transform` (unflipped): ((m + 2)², Cin, Cout) ->
    (3, 3, Cin, Cout). Written out: ``jax.linear_transpose(kernel_transform, ...)`` gives the
    same values, but made value + gradients of the 4x4 layers 17-22 % slower on XLA:CPU."""
    u = u.reshape(t.n, t.n, *u.shape[1:])
    rows = [_combine([u[a] for a in range(t.n)], [t.g[a][i] for a in range(t.n)])
            for i in range(3)]
    return jnp.stack([jnp.stack([_combine([r[c] for c in range(t.n)],
                                          [t.g[c][j] for c in range(t.n)]) for j in range(3)])
                      for r in rows])


def _tiling(hw: Sequence[int], pads: Pads, t: _Transforms) -> tuple[int, int, int, int]:
    """(H', W', th, tw): the output map of a 3x3 kernel over ``hw`` padded by ``pads``, and
    its number of m x m tiles per side (a side that m does not divide computes up to m - 1
    extra rows or columns)."""
    ho, wo = hw[0] + sum(pads[0]) - 2, hw[1] + sum(pads[1]) - 2
    return ho, wo, -(-ho // t.m), -(-wo // t.m)


def _input_tiles(x: jax.Array, pads: Pads, t: _Transforms) -> jax.Array:
    """Bᵀ d B of every input tile: (B, H, W, Cin) -> ((m + 2)², B * th * tw, Cin)."""
    b, _, _, cin = x.shape
    ho, wo, th, tw = _tiling(x.shape[1:3], pads, t)
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pads[0][0], pads[0][1] + t.m * th - ho, 0),
                  (pads[1][0], pads[1][1] + t.m * tw - wo, 0), (0, 0, 0)))
    rows = [_combine(_strided_taps(xp, 1, th, t), t.bt[a]) for a in range(t.n)]
    v = [_combine(_strided_taps(r, 2, tw, t), t.bt[c]) for r in rows for c in range(t.n)]
    return jnp.stack(v).reshape(t.n * t.n, b * th * tw, cin)


def _tiled_conv(x: jax.Array, u: jax.Array, pads: Pads, u_in_axis: int,
                t: _Transforms) -> jax.Array:
    """Winograd convolution of ``x`` (B, H, W, Cin) with a transformed kernel u
    ((m + 2)², ., .) whose input-channel axis is ``u_in_axis`` (1 or 2; the other is Cout).
    ``pads`` may be negative (cropping). Returns (B, H', W', Cout), H' = H + top + bottom - 2
    (likewise W')."""
    b, cout = x.shape[0], u.shape[3 - u_in_axis]
    ho, wo, th, tw = _tiling(x.shape[1:3], pads, t)
    prod = lax.dot_general(_input_tiles(x, pads, t), u, (((2,), (u_in_axis,)), ((0,), (0,))))
    # The output transform Aᵀ prod A of every tile, as one product with the spread matrix.
    # Written with additions and an interleaving stack, its double transpose in reverse mode
    # (the input gradient's) summed m² zero-padded maps, each recomputing its tile sums: with
    # F(4x4, 3x3) that fusion alone took 92 ms of the TAG encoder's step.
    y = lax.dot_general(t.spread.astype(prod.dtype), prod.reshape(t.n * t.n, b, th, tw, cout),
                        (((0,), (0,)), ((), ())))
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, t.m * th, t.m * tw, cout)
    return y[:, :ho, :wo]


def winograd_forward(x: jax.Array, kernel: jax.Array, pads: Pads, tile: int = 2) -> jax.Array:
    """The F(m x m, 3x3) computation, m = ``tile`` (plain JAX; see :func:`winograd_conv` for
    the public one).

    Args:
      x: (B, H, W, Cin).
      kernel: (3, 3, Cin, Cout), HWIO.
      pads: explicit zero padding ((top, bottom), (left, right)).
      tile: output tile side, 2 or 4.

    Returns:
      (B, H', W', Cout) with H' = H + top + bottom - 2, W' likewise.
    """
    t = _TRANSFORMS[tile]
    return _tiled_conv(x, kernel_transform(kernel, tile), pads, u_in_axis=1, t=t)


def input_gradient(cotangent: jax.Array, kernel: jax.Array, pads: Pads,
                   tile: int = 2) -> jax.Array:
    """The gradient of ``sum(conv(x, kernel) * cotangent)`` in ``x``, by F(m x m, 3x3).

    It is the convolution of the cotangent with the kernel flipped in space and with its
    channel axes swapped, padded ``(2 - lo, 2 - hi)`` on each axis (negative: cropped).

    Args:
      cotangent: (B, H', W', Cout), the convolution's output shape.
      kernel: (3, 3, Cin, Cout).
      pads: the forward convolution's padding ((top, bottom), (left, right)).
      tile: output tile side m of this (transposed) convolution, 2 or 4.

    Returns:
      (B, H, W, Cin).
    """
    # The channel swap is the products' contraction axis: transposing the kernel itself
    # (fused into its transform) made XLA:CPU's products 2-5x slower.
    return _tiled_conv(cotangent, kernel_transform(kernel, tile, flip=True),
                       tuple((2 - lo, 2 - hi) for lo, hi in pads), u_in_axis=2,
                       t=_TRANSFORMS[tile])


def kernel_gradient(x: jax.Array, cotangent: jax.Array, pads: Pads,
                    tile: int = 2) -> jax.Array:
    """The gradient of ``sum(conv(x, kernel) * cotangent)`` in ``kernel``, by F(m x m, 3x3).

    ``Gᵀ [Σ_tiles (Bᵀ d B) ⊗ (A dy Aᵀ)] G``: the input tiles (as in the forward) and the
    cotangent's m x m tiles spread to (m + 2) x (m + 2) by the output transform's transpose
    meet in (m + 2)² (Cin, tiles) x (tiles, Cout) products, 2.25 (m = 4) or 4 (m = 2)
    multiply-adds per output position and channel pair instead of the direct weight
    gradient's 9.

    Args:
      x: (B, H, W, Cin), the convolution's input.
      cotangent: (B, H', W', Cout), the convolution's output shape.
      pads: the convolution's padding ((top, bottom), (left, right)).
      tile: output tile side m, 2 or 4.

    Returns:
      (3, 3, Cin, Cout).
    """
    t = _TRANSFORMS[tile]
    b, ho, wo, cout = cotangent.shape
    _, _, th, tw = _tiling(x.shape[1:3], pads, t)
    dy = lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                 ((0, 0, 0), (0, t.m * th - ho, 0), (0, t.m * tw - wo, 0), (0, 0, 0)))
    # A dy Aᵀ as one product over each tile's m x m entries: written with additions, XLA:CPU
    # fused the cotangent's producer (e.g. the BatchNorm backward) into each of the results
    # and ran it (m + 2)² times.
    spread = lax.dot_general(t.spread.astype(dy.dtype), dy.reshape(b, th, t.m, tw, t.m, cout),
                             (((1, 2), (2, 4)), ((), ())))
    spread = spread.reshape(t.n * t.n, b * th * tw, cout)
    u = lax.dot_general(_input_tiles(x, pads, t), spread, (((1,), (1,)), ((0,), (0,))))
    return _kernel_transform_transpose(u, t)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _winograd_conv(x, kernel, pads, tile):
    return winograd_forward(x, kernel, pads, tile)


def _winograd_conv_jvp(pads, tile, primals, tangents):
    (x, kernel), (dx, dk) = primals, tangents
    y = _winograd_conv(x, kernel, pads, tile)
    cotangent = jax.ShapeDtypeStruct(y.shape, y.dtype)
    # Each term is the transpose of a gradient; reverse mode turns it back into that gradient.
    gradients = ((dx, functools.partial(input_gradient, kernel=kernel, pads=pads, tile=tile)),
                 (dk, functools.partial(kernel_gradient, x, pads=pads, tile=tile)))
    terms = [jax.linear_transpose(gradient, cotangent)(t)[0] for t, gradient in gradients
             if not isinstance(t, SymbolicZero)]
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_winograd_conv.defjvp(_winograd_conv_jvp, symbolic_zeros=True)


def winograd_conv(x: jax.Array, kernel: jax.Array, pads: Pads,
                  tile: int | None = None) -> jax.Array:
    """3x3 stride-1 NHWC / HWIO convolution: Winograd value and gradients (see the module
    docstring).

    Args:
      x: (B, H, W, Cin).
      kernel: (3, 3, Cin, Cout).
      pads: explicit zero padding ((top, bottom), (left, right)); the padded map must be at
        least 3x3.
      tile: output tile side, 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)); None: :func:`default_tile`
        of the output map. The input gradient uses the same tile.

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
    if tile is None:
        tile = default_tile([n - 2 for n in padded])
    if tile not in TILES:
        raise ValueError(f"winograd_conv: tile={tile!r} is not one of {TILES} (the output tile "
                         "side of F(2x2, 3x3) or F(4x4, 3x3)).")
    return _winograd_conv(x, kernel, pads, tile)

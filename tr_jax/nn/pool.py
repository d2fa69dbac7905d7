"""Max pooling as a chain of selects over window slices of the input's stride phases.

``flax.linen.max_pool`` lowers to ``lax.reduce_window``; its derivative in current JAX is a
variadic reduce-window that carries one int32 index array per input dimension (built from
full-size iotas) plus a scatter. On XLA:CPU the value and gradient of the TAG encoder's 3x3/2
pool (after BatchNorm and ReLU, (64, 64, 64, 64) float32) took 151.8 ms that way and 45.3 ms
with this module (``benchmarks/results/perf_notes.md``, section 8).

:func:`max_pool` keeps ``lax.reduce_window`` for the value (the fastest forward) and gives it
a custom JVP that pools separably, along H and then along W: the (``-inf``-padded) axis is
reshaped into (L, stride) stride phases, so every window offset is a contiguous slice of one
phase, and the offsets are folded with ``where(x_k > acc, x_k, acc)``, carrying the tangent
along (and, along W, breaking ties by the row the H pass chose). The value is the window
maximum and the gradient of each output goes to the first maximum of its window in row-major
order, as ``flax.linen.max_pool``'s does.
Every op of the rule is elementwise, a reshape or a slice, so XLA fuses it into loops and its
transpose into pads, reshapes and adds, on every backend. NaNs propagate like ``max``.

Padded positions never win a window that holds a finite value. Windows whose values are all
``-inf`` or that hold a NaN get flax's value, but their gradient may go to another element
than flax's: all ``-inf``, to a padded row (dropped, as flax) or to a real ``-inf`` next to
left padding (flax drops it); NaN, to the window's last NaN.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from tr_jax.nn.conv import Padding, as_pair, checked_output_hw, explicit_padding


def _phase_split(a: jax.Array, axis: int, stride: int, pad_lo: int, rows: int,
                 fill) -> jax.Array:
    """``a`` split along ``axis`` into (rows, stride) stride phases: ``[q, r]`` holds
    ``a[q * stride + r - pad_lo]``, ``fill`` where that index is outside ``a``.

    Window tap k of output o, ``a[o * stride + k - pad_lo]``, is then the contiguous slice
    ``[o + k // stride, k % stride]``. Strided slices instead transpose to interior
    (strided) pads, which XLA:CPU fuses into slow loops: the TAG pool's value and gradient
    took 2.1x as long with them (95.6 vs 45.3 ms, perf_notes.md, section 8).
    """
    hi = rows * stride - a.shape[axis] - pad_lo
    if hi < 0:  # trailing elements no window reaches
        a = lax.slice_in_dim(a, 0, a.shape[axis] + hi, axis=axis)
    if pad_lo or hi > 0:
        widths = [(0, 0, 0)] * a.ndim
        widths[axis] = (pad_lo, max(hi, 0), 0)
        a = lax.pad(a, jnp.array(fill, a.dtype), widths)
    return a.reshape(a.shape[:axis] + (rows, stride) + a.shape[axis + 1:])


def _pool_1d(x: jax.Array, t: jax.Array, axis: int, size: int, stride: int,
             pad: tuple[int, int], out_len: int,
             rank: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Max-pools ``x`` along one axis, carrying the tangent ``t`` of the winning element.

    Among equal maxima the first window offset wins or, given ``rank`` (integers shaped like
    ``x``), the one of lowest rank, then the first. Returns the maximum, its tangent and the
    winning offset k (int8 if ``size`` < 128), each shaped like ``x`` with ``axis`` of length
    ``out_len``.
    """
    rows = out_len + (size - 1) // stride
    # Padding never has the lowest rank, so it loses ties along this axis.
    inputs = [(x, -jnp.inf), (t, 0)]
    if rank is not None:
        inputs.append((rank, jnp.iinfo(rank.dtype).max))
    phases = [_phase_split(a, axis, stride, pad[0], rows, fill) for a, fill in inputs]
    best = winner = None
    for k in range(size):
        q, r = divmod(k, stride)
        win = [lax.slice_in_dim(lax.index_in_dim(p, r, axis + 1, keepdims=False),
                                q, q + out_len, axis=axis) for p in phases]
        if best is None:
            best, winner = win, jnp.zeros(win[0].shape, jnp.int8 if size < 128 else jnp.int32)
            continue
        # Strict ">" keeps the first maximum; "win != win" lets a NaN through, as max does.
        take = (win[0] > best[0]) | (win[0] != win[0])
        if rank is not None:
            take = take | ((win[0] == best[0]) & (win[2] < best[2]))
        best = [jnp.where(take, a, b) for a, b in zip(win, best)]
        winner = jnp.where(take, jnp.asarray(k, winner.dtype), winner)
    return best[0], best[1], winner


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, out_hw):
    del out_hw
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *pads, (0, 0)))


@_max_pool.defjvp
def _max_pool_jvp(window, strides, pads, out_hw, primals, tangents):
    # Max is separable: pool along H (each column's first maximum and its row), then along W,
    # where equal column maxima go to the lowest row, then the first column -- the row-major
    # first maximum of the 2-D window. H before W: the transpose then ends in the outer-axis
    # phase split, whose pads XLA:CPU fuses into faster loops (TAG plain step -8 to -9 %,
    # perf_notes.md section 8).
    (x,), (t,) = primals, tangents
    x, t, rows = _pool_1d(x, t, 1, window[0], strides[0], pads[0], out_hw[0])
    x, t, _ = _pool_1d(x, t, 2, window[1], strides[1], pads[1], out_hw[1], rank=rows)
    return x, t


def max_pool(x: jax.Array, window_shape: int | Sequence[int],
             strides: int | Sequence[int] | None = None, padding: Padding = "VALID") -> jax.Array:
    """2-D max pooling of an NHWC array; drop-in for ``flax.linen.max_pool``.

    Args:
      x: (B, H, W, C), floating point.
      window_shape: (kh, kw) or one int for both.
      strides: (sh, sw) or one int for both; None means (1, 1), as in flax.
      padding: ``"VALID"``, ``"SAME"``, an int or explicit ((lo, hi), (lo, hi)); padded
        positions never win a window that holds a finite value (all ``-inf`` and NaN
        windows: see the module docstring).

    Returns:
      (B, H', W', C).
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool expects x of shape (B, H, W, C); got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"max_pool expects a floating-point x; got dtype {x.dtype}.")
    window = as_pair("window_shape", window_shape)
    strides = (1, 1) if strides is None else as_pair("strides", strides)
    pads = explicit_padding(padding, x.shape[1:3], window, strides)
    out_hw = checked_output_hw(x.shape[1:3], window, strides, pads, what="window")
    return _max_pool(x, window, strides, pads, out_hw)

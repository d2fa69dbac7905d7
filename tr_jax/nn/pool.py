"""Max pooling as a chain of selects over strided window slices.

``flax.linen.max_pool`` lowers to ``lax.reduce_window``; its derivative in current JAX is a
variadic reduce-window that carries one int32 index array per input dimension (built from
full-size iotas) plus a scatter. On XLA:CPU that costs about as much as a convolution layer
of VGG-11 (~16% of a train step, see ``benchmarks/results/perf_notes.md``).

:func:`max_pool` keeps ``lax.reduce_window`` for the value (the fastest forward) and gives it
a custom JVP that pools separably, along W and then along H: the window offsets are taken as
strided slices (of the ``-inf``-padded input) and folded with ``where(x_k > acc, x_k, acc)``,
carrying the tangent along. The value is the window maximum and the gradient of each output
goes to the first maximum of its window in row-major order, as ``flax.linen.max_pool``'s does.
Every op of the rule is elementwise or a slice, so XLA fuses it into loops and its transpose
into pads and adds, on every backend. NaNs propagate like ``max``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from tr_jax.nn.conv import Padding, explicit_padding, output_hw


def _window_slice(a: jax.Array, axis: int, offset: int, stride: int, out_len: int,
                  fill) -> jax.Array:
    """``a[o * stride + offset]`` along ``axis`` for o in [0, out_len); ``fill`` outside ``a``.

    Only the out-of-range ends are padded (not the whole input), so XLA fuses slice and pad
    into the consumer.
    """
    n = a.shape[axis]
    first = max(0, -(offset // stride))                    # first o with o*stride+offset >= 0
    last = min(out_len, (n - 1 - offset) // stride + 1)    # one past the last in-range o
    if last <= first:  # the window offset never lands inside ``a``
        shape = list(a.shape)
        shape[axis] = out_len
        return jnp.full(shape, fill, a.dtype)
    start = first * stride + offset
    win = lax.slice_in_dim(a, start, start + (last - first - 1) * stride + 1, stride, axis)
    if (first, last) == (0, out_len):
        return win
    widths = [(0, 0, 0)] * a.ndim
    widths[axis] = (first, out_len - last, 0)
    return lax.pad(win, jnp.array(fill, a.dtype), widths)


def _pool_1d(x: jax.Array, t: jax.Array, axis: int, size: int, stride: int,
             pad: tuple[int, int], out_len: int) -> tuple[jax.Array, jax.Array]:
    """Max-pools ``x`` along one axis, carrying the tangent ``t`` of the first maximum."""
    out = out_t = None
    for k in range(size):
        win = _window_slice(x, axis, k - pad[0], stride, out_len, -jnp.inf)
        win_t = _window_slice(t, axis, k - pad[0], stride, out_len, 0)
        if out is None:
            out, out_t = win, win_t
            continue
        # Strict ">" keeps the first maximum; "win != win" lets a NaN through, as max does.
        take = (win > out) | (win != win)
        out, out_t = jnp.where(take, win, out), jnp.where(take, win_t, out_t)
    return out, out_t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, out_hw):
    del out_hw
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *pads, (0, 0)))


@_max_pool.defjvp
def _max_pool_jvp(window, strides, pads, out_hw, primals, tangents):
    # Max is separable: pooling along W, then along H, selects per window the first maximum
    # of the first row holding one -- the row-major first maximum of the 2-D window.
    (x,), (t,) = primals, tangents
    x, t = _pool_1d(x, t, 2, window[1], strides[1], pads[1], out_hw[1])
    return _pool_1d(x, t, 1, window[0], strides[0], pads[0], out_hw[0])


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
    """2-D max pooling of an NHWC array; drop-in for ``flax.linen.max_pool``.

    Args:
      x: (B, H, W, C), floating point.
      window_shape: (kh, kw).
      strides: (sh, sw); None means (1, 1), as in flax.
      padding: ``"VALID"``, ``"SAME"``, an int or explicit ((lo, hi), (lo, hi)); padded
        positions never win.

    Returns:
      (B, H', W', C).
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool expects x of shape (B, H, W, C); got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"max_pool expects a floating-point x; got dtype {x.dtype}.")
    window = tuple(int(k) for k in window_shape)
    strides = (1, 1) if strides is None else tuple(int(s) for s in strides)
    pads = explicit_padding(padding, x.shape[1:3], window, strides)
    out_hw = output_hw(x.shape[1:3], window, strides, pads)
    if min(out_hw) < 1:
        raise ValueError(f"window {window} with padding {pads} does not fit the map "
                         f"{x.shape[1:3]}.")
    return _max_pool(x, window, strides, pads, out_hw)

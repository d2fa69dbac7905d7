"""2-D convolution used by every tr_jax model, with a backend-aware lowering.

Parameter names and shapes match ``flax.linen.Conv`` (``kernel`` (kh, kw, Cin, Cout) in HWIO,
``bias`` (Cout,)), so checkpoints and per-task gradient code see the same tree whichever
lowering runs.

Three lowerings compute the same convolution (equal up to float rounding):

* ``"xla"`` -- ``lax.conv_general_dilated``: what ``flax.linen.Conv`` runs. The right choice
  on GPU and TPU, and on CPU for output maps of more than 16 positions that ``"winograd"``
  does not take (larger than 16x16, or not 3x3 stride 1, or fewer than 64 input channels).
* ``"im2col"`` -- patches + one matrix product: the input is padded, the kh*kw shifted
  (strided) windows are concatenated along channels into (B, H', W', kh*kw*Cin) and
  contracted with the kernel reshaped to (kh*kw*Cin, Cout). XLA:CPU computes the value and
  both gradients of a 3x3 conv on a 2x2 map (VGG-11's last block at 32x32 input, 512->512,
  batch 32) ~50x slower than this product (700 vs 14 ms,
  ``benchmarks/results/conv_lowering_avx2.md``). Autodiff of the product gives matrix
  products for both gradients, and ``vmap`` over a per-task kernel gives a batched product
  instead of a grouped convolution.
* ``"winograd"`` -- 3x3 stride-1 convolutions only: the value and both gradients by
  Winograd's F(2x2, 3x3) on maps under 8x8 and F(4x4, 3x3) from 8x8 (:mod:`tr_jax.nn.winograd`),
  2.25x and 4x fewer multiplications. On XLA:CPU (AVX2), value and both gradients of layers
  with at least 64 input channels are faster than ``"xla"`` on 4x4 to 32x32 maps
  (``benchmarks/conv_lowering.py``; ``"auto"`` uses it up to 16x16, see below); with fewer
  input channels the products are too thin and they are slower.

``lowering="auto"`` (the default) picks per call, at trace time: ``"xla"`` off CPU; on CPU
``"winograd"`` for a float32 or float64 3x3 stride-1 convolution with at least
:data:`WINOGRAD_MIN_CIN` input channels whose output map is at least :data:`WINOGRAD_MIN_SIDE`
on both sides with at most :data:`WINOGRAD_MAX_AREA` positions (4x4 to 16x16), else
``"im2col"`` when the output map has at most :data:`IM2COL_MAX_AREA` positions (2x2 and 3x3
maps, and 4x4 maps of other kernels, strides, dtypes or fewer channels), else ``"xla"``
(bfloat16 and float16 never get ``"winograd"``, see :data:`WINOGRAD_AUTO_DTYPES`). Override it
per layer (``Conv(lowering=...)``, ``conv2d(lowering=...)``) or for the whole process with the
environment variable ``TR_JAX_CONV_LOWERING`` (``auto``, ``xla``, ``im2col`` or ``winograd``;
``winograd`` applies to 3x3 stride-1 layers, the others keep ``auto``), which applies where a
layer leaves ``lowering`` at ``"auto"``. The measurements
behind the thresholds are in ``benchmarks/results/perf_notes.md``.

Inside :func:`skip_winograd` (a ``with`` block around code being traced) ``"auto"`` and the
environment variable never pick ``"winograd"``. tr_jax traces two kinds of code there: the
estimators' ``jax.jvp`` calls (:mod:`tr_jax.affinity.estimators`), because a JVP through
F(4x4, 3x3) layers evaluates the transposed transforms and was 7-9x slower than ``"xla"`` (see
:mod:`tr_jax.nn.winograd`); and on CPU the forward whose T per-task backward passes are
unrolled, for T above :data:`tr_jax.affinity.per_task.UNROLLED_WINOGRAD_MAX_TASKS`, because T
copies of the transforms made compiling slow and large.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
from typing import Any, Iterator, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tr_jax.nn.winograd import winograd_conv

Lowering = Literal["auto", "xla", "im2col", "winograd"]
LOWERINGS = ("auto", "xla", "im2col", "winograd")
ENV_VAR = "TR_JAX_CONV_LOWERING"
# On CPU, "auto" uses "winograd" for float32 / float64 3x3 stride-1 convolutions with at least
# WINOGRAD_MIN_CIN input channels whose output map is at least WINOGRAD_MIN_SIDE on both sides
# and has at most WINOGRAD_MAX_AREA positions (H' * W'), else "im2col" up to IM2COL_MAX_AREA
# positions, else "xla". Measured on XLA:CPU with its Eigen convolutions (cpu_runtime.configure;
# 2 cores, AVX2, float32, forward + both gradients, benchmarks/results/conv_lowering_avx2.md and
# perf_notes.md sections 10-12). With F(4x4, 3x3) from 8x8 maps, Winograd beat "xla" on every
# VGG layer from 4x4 to 16x16 with at least 64 input channels (batch 32, xla / F(2x2) / F(4x4)
# ms: 8x8 512->512 189 / 121 / 94; 16x16 256->256 190 / 123 / 85), and whole steps gained (VGG
# train at 64x64 654 -> 573 ms). Layers with fewer input channels lost to "xla" at every size
# (32x32 3->64 11.2 vs 18.7 ms, 16x16 32->64 9.0 vs 9.8, 4x4 32->64 1.0 vs 1.2). 32x32 maps stay
# "xla" although F(4x4, 3x3) was faster there (TAG's 64->64, batch 64: 114 vs 92 ms): in the
# TAG step, whose per-task gradients are vmapped, XLA:CPU turned the BatchNorm statistics of
# those layers' outputs into slow reduce-windows and the step took 5 % longer. Smaller sides
# waste the tiles (a 3x3 output computes 4x4). Only measured on AVX2 for 4x4 maps: on the
# AVX-512 VM, Winograd's forward lost to im2col there (33.3 vs 26.1 ms on 4x4 512->512, before
# its gradients were Winograd too); run conv_lowering.py there.
WINOGRAD_MIN_SIDE = 4
WINOGRAD_MAX_AREA = 256
WINOGRAD_MIN_CIN = 64
IM2COL_MAX_AREA = 16
# "auto" uses "winograd" only for these input dtypes: in bfloat16 its rounding error is 2-3x the
# direct convolution's (relative error 8.5e-3 vs 3e-3 on XLA:CPU; kernel gradient 8.7e-3 vs
# 4.0e-3).
WINOGRAD_AUTO_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
# Set inside skip_winograd(): "auto" then never resolves to "winograd".
_SKIP_WINOGRAD = contextvars.ContextVar("tr_jax_conv_skip_winograd", default=False)
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID")   # what lax.padtype_to_pads takes


def _check_lowering(lowering: str, where: str) -> None:
    if lowering not in LOWERINGS:
        raise ValueError(f"{where}={lowering!r} is unknown; use one of {LOWERINGS}.")


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool), or a 0-d NumPy int array."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_pair(name: str, value: int | Sequence[int], positive: bool = True) -> tuple[int, int]:
    """``value`` as an (h, w) pair of ints: an int n means (n, n).

    Args:
      name: the argument's name, for the error message.
      value: an int (NumPy ints included) or a length-2 sequence of ints.
      positive: require every entry to be >= 1 (window sizes, strides).

    Raises:
      ValueError: naming ``name`` and the expected form when ``value`` is anything else.
    """
    pair = (value, value) if _is_int(value) else value
    if (not isinstance(pair, (Sequence, np.ndarray)) or len(pair) != 2
            or not all(_is_int(v) and (v >= 1 or not positive) for v in pair)):
        form = ("a positive int n, meaning (n, n), or a pair of positive ints" if positive
                else "an int n, meaning (n, n), or a pair of ints")
        raise ValueError(f"{name}={value!r} must be {form}, e.g. {name}=(2, 2).")
    return int(pair[0]), int(pair[1])


def explicit_padding(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding as ((top, bottom), (left, right)).

    Args:
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, an int p (p on every side), a pair
        of ints (per spatial dim, both sides) or a pair of (lo, hi) pairs; ints may be NumPy
        ints.
      in_hw: input (H, W).
      kernel_hw: (kh, kw).
      strides: (sh, sw).
    """
    if isinstance(padding, str):
        if padding.upper() not in PADDING_NAMES:
            raise ValueError(f"padding={padding!r} is unknown; use one of {PADDING_NAMES}, an "
                             "int or explicit ((lo, hi), (lo, hi)) pairs.")
        pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding)
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if _is_int(padding):
        return (as_pair("padding", padding, positive=False),) * 2
    if not isinstance(padding, (Sequence, np.ndarray)) or len(padding) != 2:
        raise ValueError(f"padding={padding!r} must describe the 2 spatial dims of an NHWC "
                         "input, e.g. 'SAME', 1 or ((1, 1), (1, 1)).")
    return tuple(as_pair(f"padding[{i}]", p, positive=False) for i, p in enumerate(padding))


def output_hw(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
              pads: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(H', W') of a window op (conv, pool) over ``in_hw`` with explicit ``pads``."""
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads))


def checked_output_hw(in_hw: Sequence[int], window_hw: Sequence[int], strides: Sequence[int],
                      pads: Sequence[tuple[int, int]], what: str = "kernel") -> tuple[int, int]:
    """:func:`output_hw`, or a ValueError when the ``what`` (kernel, window) does not fit the
    padded input, i.e. the output would be empty."""
    out_hw = output_hw(in_hw, window_hw, strides, pads)
    if min(out_hw) < 1:
        raise ValueError(f"{what} {tuple(window_hw)} with padding {tuple(pads)} does not fit the "
                         f"map {tuple(in_hw)} (output {out_hw}); use a smaller {what} or more "
                         "padding, e.g. padding='SAME'.")
    return out_hw


def winograd_applies(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the ``"winograd"`` lowering can compute this convolution (3x3, stride 1)."""
    return tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)


@contextlib.contextmanager
def skip_winograd() -> Iterator[None]:
    """Within the block, layers left at ``lowering="auto"`` that are *traced* there never use
    ``"winograd"`` (nor does ``TR_JAX_CONV_LOWERING=winograd``): they get ``"im2col"`` or
    ``"xla"`` by output map size; an explicit ``lowering="winograd"`` is kept. Values equal up
    to float rounding. Wrap code differentiated in forward mode only (``jax.jvp``: the
    Winograd tangents run the transposed transforms, 7-9x slower than ``"xla"`` with
    F(4x4, 3x3)), or code unrolled many times. It acts at trace time, so put it inside the
    jitted function.
    """
    token = _SKIP_WINOGRAD.set(True)
    try:
        yield
    finally:
        _SKIP_WINOGRAD.reset(token)


def resolve_lowering(lowering: str, x_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int] = (1, 1), padding: Padding = "SAME", *,
                     dtype: Any = jnp.float32) -> str:
    """The concrete lowering (``"xla"``, ``"im2col"`` or ``"winograd"``) a call will use.

    ``"auto"`` first defers to the ``TR_JAX_CONV_LOWERING`` environment variable (whose
    ``winograd`` leaves layers it cannot compute to the automatic choice), then picks by
    backend (``jax.default_backend()``), output map size and ``dtype`` (the input's; only
    :data:`WINOGRAD_AUTO_DTYPES` get ``"winograd"``) as described in the module docstring.
    Inside :func:`skip_winograd`, ``"auto"`` never gives ``"winograd"``.
    """
    _check_lowering(lowering, "lowering")
    strides = as_pair("strides", strides)
    if lowering == "auto":
        lowering = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        _check_lowering(lowering, ENV_VAR)
        if lowering == "winograd" and (_SKIP_WINOGRAD.get()
                                       or not winograd_applies(kernel_shape, strides)):
            lowering = "auto"
    if lowering != "auto":
        return lowering
    if jax.default_backend() != "cpu":
        return "xla"
    pads = explicit_padding(padding, x_shape[1:3], kernel_shape[:2], strides)
    ho, wo = output_hw(x_shape[1:3], kernel_shape[:2], strides, pads)
    if (min(ho, wo) >= WINOGRAD_MIN_SIDE and ho * wo <= WINOGRAD_MAX_AREA
            and kernel_shape[2] >= WINOGRAD_MIN_CIN and winograd_applies(kernel_shape, strides)
            and jnp.dtype(dtype) in WINOGRAD_AUTO_DTYPES and not _SKIP_WINOGRAD.get()):
        return "winograd"
    return "im2col" if ho * wo <= IM2COL_MAX_AREA else "xla"


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = (1, 1),
                padding: Padding = "SAME") -> jax.Array:
    """Convolution as patches + one matrix product.

    Args:
      x: (B, H, W, Cin).
      kernel: (kh, kw, Cin, Cout), HWIO.
      strides: (sh, sw).
      padding: see :func:`explicit_padding`.

    Returns:
      (B, H', W', Cout), equal to ``lax.conv_general_dilated`` up to summation order.
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides = as_pair("strides", strides)
    pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    ho, wo = checked_output_hw(x.shape[1:3], (kh, kw), strides, pads)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    b = x.shape[0]
    windows = [lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                         (1, sh, sw, 1))
               for i in range(kh) for j in range(kw)]
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    # Patch channels are ordered (i, j, c), as the rows of the HWIO kernel reshaped.
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())))


def conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = (1, 1),
           padding: Padding = "SAME", *, lowering: Lowering = "auto") -> jax.Array:
    """NHWC / HWIO convolution through the chosen lowering (see the module docstring).

    Args:
      x: (B, H, W, Cin).
      kernel: (kh, kw, Cin, Cout).
      strides: (sh, sw) or one int for both.
      padding: ``"SAME"``, ``"VALID"``, an int, or explicit pairs.
      lowering: ``"auto"``, ``"xla"``, ``"im2col"`` or ``"winograd"`` (3x3 stride 1 only).

    Returns:
      (B, H', W', Cout).

    Raises:
      ValueError: on mismatched shapes or dtypes, malformed strides or padding, or a kernel
        that does not fit the padded input (an empty output), whichever the lowering.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d expects x (B, H, W, Cin) and kernel (kh, kw, Cin, Cout) with "
                         f"matching Cin; got x {x.shape} and kernel {kernel.shape}.")
    if x.dtype != kernel.dtype:
        raise ValueError(f"conv2d expects x and kernel of one dtype; got {x.dtype} and "
                         f"{kernel.dtype}. Cast one of them (Conv promotes both to its dtype).")
    strides = as_pair("strides", strides)
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    checked_output_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
    chosen = resolve_lowering(lowering, x.shape, kernel.shape, strides, pads, dtype=x.dtype)
    if chosen == "im2col":
        return im2col_conv(x, kernel, strides, pads)
    if chosen == "winograd":
        if not winograd_applies(kernel.shape, strides):
            raise ValueError(f"lowering='winograd' computes 3x3 stride-1 convolutions; got "
                             f"kernel {kernel.shape[:2]}, strides {strides}.")
        return winograd_conv(x, kernel, pads)
    return lax.conv_general_dilated(x, kernel, strides, pads,
                                    dimension_numbers=DIMENSION_NUMBERS)


class Conv(nn.Module):
    """NHWC convolution with ``flax.linen.Conv``'s parameters and a backend-aware lowering.

    Attributes:
      features: output channels Cout.
      kernel_size: (kh, kw) or one int for both.
      strides: (sh, sw) or one int for both.
      padding: ``"SAME"``, ``"VALID"``, an int or explicit ((lo, hi), (lo, hi)).
      use_bias: adds a (Cout,) bias.
      dtype: computation dtype (None: from inputs and params).
      param_dtype: parameter dtype.
      kernel_init: kernel initializer (flax's default: LeCun normal).
      bias_init: bias initializer.
      lowering: ``"auto"`` (backend and shape decide; ``TR_JAX_CONV_LOWERING`` overrides),
        ``"xla"``, ``"im2col"`` or ``"winograd"`` (3x3 stride 1 only).
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    lowering: Lowering = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, Cin) -> (B, H', W', Cout)."""
        kh, kw = as_pair("kernel_size", self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding, lowering=self.lowering)
        return y if bias is None else y + bias

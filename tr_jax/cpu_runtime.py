"""Process settings that make XLA:CPU steps faster; call :func:`configure` first thing.

Three settings, each measured on the project's 2-core x86 VM (AVX-512) with jax 0.10.2
(``benchmarks/results/perf_notes.md``):

* :func:`keep_freed_buffers` -- XLA:CPU takes every step's buffers (activations, gradients,
  outputs) from ``malloc``. glibc serves large requests (over its mmap threshold, at most
  32 MiB) with fresh ``mmap`` pages and gives them back on ``free``, so every step pays the
  kernel again for zero-filling each page on first touch. Serving every request from the one
  main heap and never trimming it lets a step reuse the previous step's pages. A 67 MB
  strided-slice maximum went from 16 to 3.6 ms, the TAG CelebA plain step from 510 to 435 ms.
  The price: the process keeps its peak heap until it exits.
* :func:`prefer_eigen_convolutions` -- jaxlib 0.10 hands convolutions to its YNNPACK library
  by default; XLA's Eigen convolutions are ~1.8x faster here for 64-channel 3x3 layers
  (TAG's 32x32 64->64 convolution, forward and both gradients: 166 -> 94 ms) and no slower
  elsewhere. The TAG plain step went from 430 to 318 ms.
* :func:`prefer_legacy_loop_emitters` -- jaxlib 0.10 generates XLA:CPU's loop fusions with
  its newer MLIR emitters by default. The older LLVM IR emitters
  (``--xla_cpu_use_fusion_emitters=false``) run the reduce-window of TAG's 3x3/2 max-pool
  forward 3x faster (64x64x64x64: 11.3 -> 3.6 ms) and fused transposes up to 2x faster, and
  compile 10-25 % faster. TAG step T = 9: 2691 -> 2494-2548 ms; the plain and VGG steps
  are no slower (section 15 of ``perf_notes.md``).

The ``tr-jax`` command line, the benchmarks and the tests call :func:`configure`; library
users opt in with ``tr_jax.cpu_runtime.configure()`` before their first JAX computation.
None of them touches GPU or TPU computations. The first two change no result; the legacy
emitters round differently (another order of float operations): after three TAG steps
(T = 9) the parameters differed by up to 1.5e-5 of their largest entry and the lookahead
affinity by up to 9e-5 of its largest.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import sys

import jaxlib

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONV_FLAG = f"{YNN_FLAG}=-individual_convolution"
EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"
LEGACY_EMITTERS_FLAG = f"{EMITTERS_FLAG}=false"
# XLA aborts the process on a flag it does not know: the flags are set only for the jaxlib
# releases they were measured with.
MEASURED_JAXLIB = ((0, 10),)


def keep_freed_buffers() -> bool:
    """Configures glibc's malloc to keep and reuse freed memory (see the module docstring).

    Process-wide and idempotent; call it before the first JAX computation (threads keep the
    arena they first allocated from).

    Returns:
      True when applied; False where the C library is not glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)


def _backends_initialized() -> bool:
    """Whether JAX has created its backends (and so XLA has read ``XLA_FLAGS``).

    Asks JAX's private ``xla_bridge``; where a JAX release moved it, answers True, so that
    :func:`_add_xla_flag` leaves the flags alone instead of failing.
    """
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return True


def _add_xla_flag(name: str, flag: str) -> bool:
    """Appends ``flag`` (``name=value``) to XLA_FLAGS for the backends still to be created.

    XLA reads the flags when JAX creates its backends (the first computation), so this only
    acts before then. It leaves XLA_FLAGS alone when they already set ``name`` (your choice
    wins) and on jaxlib releases the flag was not measured with (:data:`MEASURED_JAXLIB`).

    Returns:
      True when ``flag`` is in XLA_FLAGS for the backends still to be created.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if name in flags:
        return flag in flags.split()
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
    if version not in MEASURED_JAXLIB or _backends_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return True


def prefer_eigen_convolutions() -> bool:
    """Adds ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to XLA_FLAGS
    (see the module docstring; unless XLA_FLAGS set the YNN fusion types, before the first
    computation, on jaxlib 0.10). Returns whether the flag is set for the coming backends."""
    return _add_xla_flag(YNN_FLAG, EIGEN_CONV_FLAG)


def prefer_legacy_loop_emitters() -> bool:
    """Adds ``--xla_cpu_use_fusion_emitters=false`` to XLA_FLAGS (see the module docstring;
    unless XLA_FLAGS set that flag, before the first computation, on jaxlib 0.10). Returns
    whether the flag is set for the coming backends."""
    return _add_xla_flag(EMITTERS_FLAG, LEGACY_EMITTERS_FLAG)


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """The CPU's model name and widest vector ISA, for labelling benchmark results.

    XLA, oneDNN and MKL pick kernels by ISA, so the same benchmark gives different speed
    ratios on an AVX2 and an AVX-512 machine of the same model family.

    Args:
      cpuinfo: Linux's CPU description.

    Returns:
      ``(model, isa)``; ``isa`` is ``"avx512"``, ``"avx2"``, ``"avx"``, ``"noavx"`` (x86
      flags without AVX) or ``"unknown"`` (no such file, or no ``flags`` line as on ARM).
    """
    path = pathlib.Path(cpuinfo)
    model, flags = platform.processor() or platform.machine(), set()
    for line in path.read_text().splitlines() if path.is_file() else ():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    isa = next((isa for flag, isa in (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"))
                if flag in flags), "noavx" if flags else "unknown")
    return model, isa


def describe_machine(features: tuple[str, str] | None = None) -> str:
    """One line for result files, e.g. ``"x86_64 CPU (AMD EPYC 9B14, avx2), 2 cores"``.

    Args:
      features: :func:`cpu_features`'s result where the caller already has it.
    """
    model, isa = features or cpu_features()
    return f"{platform.machine()} CPU ({model}, {isa}), {os.cpu_count()} cores"


def configure() -> dict[str, bool]:
    """Applies the three settings; returns which ones took effect (by function name)."""
    return {"keep_freed_buffers": keep_freed_buffers(),
            "prefer_eigen_convolutions": prefer_eigen_convolutions(),
            "prefer_legacy_loop_emitters": prefer_legacy_loop_emitters()}

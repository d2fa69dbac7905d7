"""Host memory allocation for XLA:CPU: keep freed step buffers for reuse.

XLA:CPU takes every step's buffers (activations, gradients, the outputs) from ``malloc``. glibc
serves large requests (over its mmap threshold, at most 32 MiB) with fresh ``mmap`` pages and
gives them back on ``free``, so every step pays the kernel again for zero-filling each page on
first touch; and requests from XLA's worker threads go to per-thread arenas whose heaps cannot
hold them. :func:`keep_freed_buffers` makes glibc serve every request from its one main heap
and never trim it, so a step's buffers reuse the pages of the previous step's.

Measured on the project's 2-core VM (``benchmarks/results/perf_notes.md``): a 67 MB
strided-slice maximum 16 -> 3.6 ms; the TAG CelebA plain step 505 -> 420-450 ms, the routed
VGG-11-BN train step at 32x32 228 -> 202-207 ms (3 interleaved rounds, separate processes).

The price is that the process keeps its peak heap size until it exits. The ``tr-jax`` command
line and the benchmarks call it; library users opt in (or start Python with the equivalent
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:``
``glibc.malloc.arena_max=1``).
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))


def keep_freed_buffers() -> bool:
    """Configures glibc's malloc to keep and reuse freed memory (see the module docstring).

    Call it before the first JAX computation (threads keep the arena they first allocated
    from). Process-wide and idempotent.

    Returns:
      True when applied; False where the C library is not glibc (macOS, musl), where it does
      nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)

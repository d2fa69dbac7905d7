"""How the T per-task computations of an affinity run inside one jit: the strategies.

Measured on XLA:CPU (2 cores, AVX2; the TAG CelebA encoder, 64x64, batch 64; whole TAG step,
``benchmarks/results/affinity_cost.md``, 2026-11-27):

- T = 9: backward and forward ``"unrolled"`` 3.52 s, ``"auto"`` (below) 3.48 s, ``"chunked"``
  (vmapped chunks of 3) 4.29 s, full ``"vmap"`` 5.57 s with 4.1 GB peak instead of 1.2-1.5 GB:
  vmapping per-task weights turns the lookahead's convolutions into grouped convolutions,
  which XLA:CPU runs slowly. T = 40: ``"auto"`` 14.8 s, ``"unrolled"`` 14.9 s, ``"chunked"``
  16.7 s, a Python loop over jitted pieces 19.0 s (the plain step: 0.43 s).
- Per-task backward passes: inside a ``jax.lax.map`` loop XLA:CPU leaves the transposed
  (gradient) convolutions in a non-canonical layout that it runs with a naive kernel, 50-200x
  slower (a probe: one 64x64-channel conv's kernel gradient took 215 s in a loop vs 0.95 s
  unrolled), so on CPU the backward passes are unrolled whatever the forward strategy.

On GPU/TPU ``vmap`` is the natural choice; chunks bound memory at large T.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

Strategy = Literal["auto", "vmap", "unrolled", "chunked"]
STRATEGIES = ("auto", "vmap", "unrolled", "chunked")

# "auto" on CPU: lookahead forwards in a loop of chunks of this size; backward passes unrolled.
AUTO_CPU_CHUNK = 1
# "auto" on accelerators: vmap all tasks up to this many, else vmapped chunks of this size.
AUTO_ACCEL_VMAP_MAX = 64


def check_chunk_size(chunk_size: int | None) -> None:
    """Raises unless ``chunk_size`` is None or a positive int."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")


def resolve_strategy(strategy: str, num_tasks: int, chunk_size: int | None, *,
                     backward: bool = False) -> tuple[str, int | None]:
    """The concrete ``(strategy, chunk_size)`` to run T per-task computations with.

    Args:
      strategy: ``"auto"``, ``"vmap"``, ``"unrolled"`` or ``"chunked"``.
      num_tasks: T.
      chunk_size: tasks per chunk for ``"chunked"`` (None: the automatic choice).
      backward: the computations are backward passes (per-task gradients) rather than
        forwards. On CPU, ``"auto"`` and ``"chunked"`` backward passes run ``"unrolled"``
        (see the module docstring); ``"vmap"`` is kept when asked for.

    Returns:
      ``(strategy, chunk_size)`` with strategy in ``"vmap"``, ``"unrolled"``, ``"chunked"``.
      ``"auto"`` picks, on CPU: backward ``"unrolled"``, forward ``"chunked"`` by
      ``chunk_size or AUTO_CPU_CHUNK``; on GPU/TPU: ``"vmap"`` up to ``AUTO_ACCEL_VMAP_MAX``
      tasks (and no chunk_size given), else ``"chunked"`` by ``chunk_size`` or that many.

    Raises:
      ValueError: unknown strategy or a bad chunk_size.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    check_chunk_size(chunk_size)
    cpu = jax.default_backend() == "cpu"
    if backward and strategy != "unrolled" and unrolls_backward(strategy):
        return "unrolled", None
    if strategy != "auto":
        return strategy, chunk_size
    if cpu:
        return "chunked", chunk_size or AUTO_CPU_CHUNK
    if num_tasks <= AUTO_ACCEL_VMAP_MAX and chunk_size is None:
        return "vmap", None
    return "chunked", chunk_size or AUTO_ACCEL_VMAP_MAX


def unrolls_backward(strategy: str) -> bool:
    """Whether per-task backward passes run by ``strategy`` are unrolled whatever T is:
    ``"unrolled"``, and on CPU ``"auto"`` and ``"chunked"`` too (see :func:`resolve_strategy`)."""
    return strategy == "unrolled" or (strategy in ("auto", "chunked")
                                      and jax.default_backend() == "cpu")


def after(x: Any, previous: Any) -> Any:
    """``x`` unchanged, but computed only once every leaf of ``previous`` is.

    A zero-valued data dependency (``x + 0 * finite(sum(previous))``) on the floating-point
    leaves of ``x``. It makes XLA finish one task's computation, reductions included, before
    the next starts, so their temporaries share memory: on XLA:CPU the unrolled per-task
    backward passes of the TAG CelebA encoder otherwise keep one (B, 64, 64, 64) cotangent per
    task alive until the end (temp memory 683 MiB at T = 4, 1605 MiB at T = 12; with the
    dependency 428 and 430 MiB, and faster). ``jax.lax.optimization_barrier`` does not do
    this: XLA:CPU removes barriers before scheduling.
    """
    total = sum(jnp.sum(leaf, dtype=jnp.float32) for leaf in jax.tree.leaves(previous)
                if jnp.issubdtype(leaf.dtype, jnp.inexact))
    if isinstance(total, int):        # no floating-point leaf to wait for
        return x
    zero = jnp.where(jnp.isfinite(total), total, 0.0) * 0.0
    return jax.tree.map(lambda a: a + zero.astype(a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, x)


def map_tasks(fn: Callable, xs: Any, strategy: str, chunk_size: int | None = None):
    """Applies ``fn`` to every slice along the leading (task) axis of ``xs`` and stacks.

    Args:
      fn: function of one task's slice.
      xs: tree whose leaves share a leading axis T.
      strategy: ``"vmap"`` (one batched call), ``"unrolled"`` (a Python loop: T calls traced
        one after the other into the same jit, each sequenced after the previous one by
        :func:`after`) or ``"chunked"`` (``jax.lax.map`` with
        ``batch_size=chunk_size``: vmap inside chunks, chunks run sequentially in a loop).
      chunk_size: tasks per chunk for ``"chunked"`` (None: one chunk of T).

    Returns:
      The stacked outputs, leading axis T.
    """
    if strategy == "vmap":
        return jax.vmap(fn)(xs)
    num = jax.tree.leaves(xs)[0].shape[0]
    if strategy == "unrolled":
        outs = []
        for i in range(num):
            x = jax.tree.map(lambda a, i=i: a[i], xs)
            outs.append(fn(after(x, outs[-1]) if outs else x))
        return jax.tree.map(lambda *o: jnp.stack(o), *outs)
    if strategy == "chunked":
        return jax.lax.map(fn, xs, batch_size=chunk_size or num)
    raise ValueError(f"unknown strategy {strategy!r}; use 'vmap', 'unrolled' or 'chunked'.")

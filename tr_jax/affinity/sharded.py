"""Task-parallel TAG lookahead affinity: the rows of Z split over the mesh's ``"task"`` axis.

Each device of the ``"task"`` axis takes a block of source tasks i and computes, for its
block only, the per-task gradients (the VJP of the loss vector with the one-hot cotangents
of its rows) and the lookahead forwards ``L(θ_s - Δ_i)``; the (T, T) matrix is gathered once
at the end. Inside a block the usual strategies apply (``"chunked"`` bounds memory at
T = 312). The ``"data"`` axis stays automatic: the batch may be split over it and GSPMD
reduces the losses across it.

The one forward pass is repeated on every task device (it is one of T + 1 passes); T need
not be divisible by the task axis size: the last block is padded with zero cotangents whose
rows are dropped.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from tr_jax.affinity.lookahead import (UpdateFn, affinity_from_losses, check_lr,
                                       lookahead_losses, sgd_update)
from tr_jax.affinity.per_task import (LossFn, PyTree, assert_task_axis, check_losses,
                                      check_shared, task_vjp)
from tr_jax.affinity.strategy import Strategy, map_tasks, resolve_strategy
P = jax.P  # the task axis is tr_jax.sharding.TASK = "task" (not imported: tr_jax.sharding
# imports tr_jax.train, which may import tr_jax.affinity)


def sharded_lookahead_affinity(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch: Any, *,
                               lr: float, mesh: Mesh, update_fn: UpdateFn | None = None,
                               strategy: Strategy = "auto", chunk_size: int | None = None,
                               losses_and_grads: tuple[jax.Array, PyTree] | None = None,
                               axis: str = "task") -> jax.Array:
    """:func:`tr_jax.affinity.lookahead_affinity` with source tasks split over ``axis``.

    Same arguments and result as ``lookahead_affinity`` (jittable; call it inside the jitted
    train step), plus the restriction that ``loss_fn`` must get the arrays it indexes (e.g.
    routing masks gathered per example) through ``rest``, not from a closure, when they are
    sharded on the mesh (a JAX restriction of ``shard_map``); and:

    Args:
      mesh: the device mesh (:func:`tr_jax.sharding.make_mesh`).
      axis: the mesh axis that splits the source tasks.
      strategy, chunk_size: how each device runs its block of ceil(T / n) tasks.
        ``"chunked"`` fuses each chunk's per-task gradients with their lookahead forwards
        (a ``jax.lax.map`` loop), so at most ``chunk_size`` gradients of ``shared`` exist per
        device: the memory-bounded choice, on every backend (on XLA:CPU gradient convolutions
        run slower inside loops; see :mod:`tr_jax.affinity.strategy`). ``"auto"`` decides on
        the block size with :func:`~tr_jax.affinity.strategy.resolve_strategy`: on CPU
        backward passes unrolled (all the block's gradients held) and lookahead forwards in a
        loop; on GPU/TPU vmap up to 64 tasks per device, else fused chunks.
      losses_and_grads: precomputed (losses (T,), per-task grads (T, ...)): each device then
        runs only the lookahead forwards of its rows.

    Returns:
      Z (T, T), ``Z[i, j]`` = effect of a step on source task i onto target task j,
      replicated over the mesh.
    """
    check_lr(lr)
    check_shared(shared)
    if axis not in mesh.shape:
        raise ValueError(f"axis={axis!r} is not a mesh axis; the mesh has {tuple(mesh.shape)}.")
    n = mesh.shape[axis]
    if losses_and_grads is None:
        num_tasks = check_losses(jax.eval_shape(loss_fn, shared, rest, batch))
        sources = _pad_rows(jnp.eye(num_tasks, dtype=jnp.float32), n)
    else:
        losses, grads = losses_and_grads
        num_tasks = check_losses(losses)
        assert_task_axis(grads, shared, num_tasks)
        sources = jax.tree.map(lambda g: _pad_rows(g, n), grads)
    block = math.ceil(num_tasks / n)
    forward, chunk = resolve_strategy(strategy, block, chunk_size)
    backward, back_chunk = (resolve_strategy(strategy, block, chunk_size, backward=True)
                            if strategy == "auto" else (forward, chunk))
    lookahead = functools.partial(lookahead_losses, loss_fn,
                                  update_fn=update_fn or sgd_update(lr))

    def rows(sources, shared, rest, batch):
        if losses_and_grads is not None:
            return lookahead(shared, rest, batch, sources, strategy=forward, chunk_size=chunk)
        losses, pullback = task_vjp(lambda s: loss_fn(s, rest, batch), shared,
                                    strategy=backward)
        sources = sources.astype(losses.dtype)
        if backward != "chunked":
            (grads,) = map_tasks(pullback, sources, backward, back_chunk)
            return losses, lookahead(shared, rest, batch, grads, strategy=forward,
                                     chunk_size=chunk)

        def source_row(one_hot):  # one source task: its gradient, then its lookahead losses
            (grad,) = pullback(one_hot)
            grad = jax.tree.map(lambda g: g[None], grad)
            return lookahead(shared, rest, batch, grad, strategy="vmap")[0]

        # Gradient and lookahead fused per chunk: only `chunk` gradients exist at a time
        # (not the device's whole block of T / n), which bounds memory for large encoders.
        return losses, map_tasks(source_row, sources, "chunked", chunk)

    # check_vma=False: the body is purely local (no collectives); each device differentiates
    # its own copy of the forward against its own cotangent rows, which the varying-axis type
    # check would otherwise reject (replicated primal output, task-varying cotangent).
    given = losses_and_grads is not None
    try:
        out = jax.shard_map(rows, mesh=mesh, in_specs=(P(axis), P(), P(), P()),
                            out_specs=P(axis) if given else (P(), P(axis)), axis_names={axis},
                            check_vma=False)(sources, shared, rest, batch)
    except ValueError as e:
        if "Context mesh" not in str(e):
            raise
        raise ValueError(
            "loss_fn indexes an array sharded on the mesh that it closes over, which JAX does "
            "not allow inside the task-parallel shard_map: pass such arrays (routing masks, "
            "BatchNorm statistics) to loss_fn through `rest` instead.") from e
    losses, after = (losses_and_grads[0], out) if given else out
    z = affinity_from_losses(losses, after[:num_tasks], lr)
    return jax.lax.with_sharding_constraint(z, NamedSharding(mesh, P()))


def task_parallel(mesh: Mesh, axis: str = "task") -> Callable[..., jax.Array]:
    """TAG lookahead with source tasks split over ``axis``, as a train-step affinity function.

    Returns ``fn(loss_fn, shared, rest, batch, *, lr, update_fn=None, key=None,
    strategy="auto", chunk_size=None) -> (T, T)`` (the signature of
    ``tr_jax.train.AFFINITIES``; ``key`` is unused): pass it as
    ``make_train_step(..., affinity="lookahead", affinity_fn=task_parallel(mesh))``.
    """

    def affinity(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch, *, lr: float,
                 update_fn: UpdateFn | None = None, key=None, strategy: Strategy = "auto",
                 chunk_size: int | None = None) -> jax.Array:
        del key
        return sharded_lookahead_affinity(loss_fn, shared, rest, batch, lr=lr, mesh=mesh,
                                          update_fn=update_fn, strategy=strategy,
                                          chunk_size=chunk_size, axis=axis)

    return affinity


def _pad_rows(x: jax.Array, n: int) -> jax.Array:
    """Pads the leading axis with zeros up to a multiple of ``n``."""
    pad = -x.shape[0] % n
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x

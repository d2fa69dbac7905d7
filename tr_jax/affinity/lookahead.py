"""TAG lookahead affinity (Fifty et al., NeurIPS 2021).

``Z[i, j] = (1 - L_j(θ_s - Δ_i) / L_j(θ_s)) / lr``: how much one step on task i alone lowers
task j's loss on the same batch (source i = row, target j = column; positive = i helps j).
Only the shared parameters θ_s move; ``rest`` (heads etc.) stays.

BatchNorm: ``loss_fn`` is pure, so it decides how BatchNorm behaves, and it cannot update the
running averages. The official code evaluates both the losses before and the lookahead losses
with the batch's own statistics (training mode); write ``loss_fn`` with
``model.apply(..., train=True, mutable=["batch_stats"])`` and discard the returned updates,
so that every lookahead forward normalizes with the statistics of the moved encoder on this
batch, as the official lookahead does.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tr_jax.affinity.per_task import (LossFn, PyTree, assert_task_axis, check_losses,
                                      check_shared, merge_params, per_task_grads, select_like)
from tr_jax.affinity.strategy import Strategy, map_tasks, resolve_strategy

__all__ = ["UpdateFn", "affinity_from_losses", "check_lr", "lookahead_affinity",
           "lookahead_losses", "optax_lookahead", "sgd_update"]

UpdateFn = Callable[[PyTree], PyTree]


def check_lr(lr: Any) -> None:
    """Raises unless ``lr`` is a positive number (Z is divided by it)."""
    if isinstance(lr, jax.core.Tracer):
        return
    if not (jnp.ndim(lr) == 0 and float(lr) > 0):
        raise ValueError(f"lr must be a positive scalar (Z is normalized by it), got {lr!r}.")


def sgd_update(lr: float) -> UpdateFn:
    """Δ_i = lr * g_i: the plain SGD step on task i's gradient (the default lookahead)."""
    return lambda g: jax.tree.map(lambda a: lr * a, g)


def optax_lookahead(tx: optax.GradientTransformation, opt_state: optax.OptState,
                    shared: PyTree, rest: PyTree | None = None) -> UpdateFn:
    """The step the optimizer would take from one task's gradient, at its current state.

    Sign convention: the returned ``update_fn(g_i)`` gives Δ_i, the step that is
    **subtracted** from θ_s (optax's ``updates`` are added, so Δ_i = -updates). The optimizer
    state is read, never advanced. For ``optax.sgd(lr, momentum=m)`` this is
    Δ_i = lr * (g_i + m * buf) -- the official CelebA lookahead ``lr*g - momentum*velocity``
    with Keras' velocity = -lr * buf, i.e. plain ``lr * g_i`` on the first step.

    Args:
      tx: the optimizer.
      opt_state: its current state: for the shared tree alone when ``rest`` is None, else for
        the whole tree ``merge_params(shared, rest)`` (the train state's optimizer state).
      shared: the shared parameters θ_s (nested dict when ``rest`` is given).
      rest: the other parameters, or None.

    Returns:
      ``update_fn(g_i) -> Δ_i`` (a tree like ``shared``).

    Note:
      With ``rest`` given, the optimizer sees the full-tree gradient with zeros for ``rest``
      and only the shared part of its updates is kept. That is the exact lookahead for
      element-wise transformations (SGD, momentum, Adam/AdamW, weight decay, schedules).
      Transformations that couple leaves (``clip_by_global_norm``, LARS/LAMB trust ratios)
      see only the shared gradient's norm.
    """
    params = shared if rest is None else merge_params(shared, rest)
    zeros = None if rest is None else jax.tree.map(jnp.zeros_like, rest)

    def update_fn(g: PyTree) -> PyTree:
        full = g if rest is None else merge_params(g, zeros)
        updates, _ = tx.update(full, opt_state, params)
        if rest is not None:
            updates = select_like(updates, shared)
        return jax.tree.map(jnp.negative, updates)

    return update_fn


def lookahead_losses(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch: Any,
                     grads: PyTree, *, update_fn: UpdateFn, strategy: Strategy = "auto",
                     chunk_size: int | None = None) -> jax.Array:
    """All task losses after a step of each task alone: (T, T), [i, j] = L_j(θ_s - Δ_i).

    Args:
      loss_fn: ``loss_fn(shared, rest, batch) -> (T,)``.
      shared, rest, batch: as for :func:`lookahead_affinity`.
      grads: per-task gradients of ``shared`` with a leading task axis T.
      update_fn: ``g_i -> Δ_i``, the step subtracted from θ_s.
      strategy, chunk_size: how the T lookahead forwards run (see :func:`lookahead_affinity`).

    Returns:
      (T, T) losses, row = source task i, column = target task j.
    """
    num_tasks = jax.tree.leaves(grads)[0].shape[0]
    strategy, chunk_size = resolve_strategy(strategy, num_tasks, chunk_size)

    def after(g: PyTree) -> jax.Array:
        moved = jax.tree.map(lambda s, d: s - d.astype(s.dtype), shared, update_fn(g))
        return loss_fn(moved, rest, batch)

    out = map_tasks(after, grads, strategy, chunk_size)
    check_losses(out[0], "loss_fn (at a lookahead point)")
    return out


def affinity_from_losses(before: jax.Array, after: jax.Array, lr: float) -> jax.Array:
    """Z[i, j] = (1 - after[i, j] / before[j]) / lr."""
    return (1.0 - after / before[None, :]) / lr


def lookahead_affinity(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch: Any, *,
                       lr: float, update_fn: UpdateFn | None = None,
                       strategy: Strategy = "auto", chunk_size: int | None = None,
                       losses_and_grads: tuple[jax.Array, PyTree] | None = None) -> jax.Array:
    """TAG lookahead affinity of every task onto every task, on one batch.

    Pure and jittable (``loss_fn``, ``update_fn``, ``strategy`` and ``chunk_size`` static):
    one forward and T backward passes (the VJP of the loss vector pulled back with one-hot
    cotangents, :func:`per_task_grads`), then T lookahead forwards of ``loss_fn`` at
    θ_s - Δ_i.

    Args:
      loss_fn: ``loss_fn(shared, rest, batch) -> (T,)`` per-task losses (pure: see the module
        docstring for BatchNorm).
      shared: shared parameters θ_s (the only ones the lookahead moves).
      rest: everything else the loss needs (task heads, BatchNorm statistics, masks).
      batch: one batch; the same batch is used before and after the lookahead.
      lr: learning rate; Z is normalized by it. Must be > 0.
      update_fn: ``g_i -> Δ_i``, the step **subtracted** from θ_s for task i's shared
        gradient g_i. None: plain SGD, Δ_i = lr * g_i. Use :func:`optax_lookahead` for the
        optimizer's own step (momentum, Adam).
      strategy: how the T backward passes and T lookahead forwards run -- ``"vmap"``
        (batched over source tasks; per-task conv kernels become grouped convolutions),
        ``"unrolled"`` (a Python loop traced into the jit: compile time grows with T),
        ``"chunked"`` (``jax.lax.map`` with ``batch_size=chunk_size``: vmapped chunks run in
        a loop; bounded memory and compile time) or ``"auto"``. See
        :func:`tr_jax.affinity.strategy.resolve_strategy` for what ``"auto"`` picks (on CPU:
        backward passes unrolled, forwards in a loop one task at a time). All give the same
        numbers.
      chunk_size: tasks per chunk for ``"chunked"`` (None: ``"auto"``'s choice or T).
      losses_and_grads: ``(losses, grads)`` from :func:`per_task_grads` when the caller
        already has them (a train step); skips recomputing them.

    Returns:
      Z, (T, T): ``Z[i, j] = (1 - L_j(θ_s - Δ_i) / L_j(θ_s)) / lr``, source i, target j.

    Raises:
      ValueError: lr <= 0, empty ``shared``, losses not of shape (T,), unknown strategy.
    """
    check_lr(lr)
    check_shared(shared)
    if losses_and_grads is None:
        losses_and_grads = per_task_grads(loss_fn, shared, rest, batch, strategy=strategy,
                                          chunk_size=chunk_size)
    losses, grads = losses_and_grads
    assert_task_axis(grads, shared, check_losses(losses))
    after = lookahead_losses(loss_fn, shared, rest, batch, grads,
                             update_fn=update_fn or sgd_update(lr), strategy=strategy,
                             chunk_size=chunk_size)
    return affinity_from_losses(losses, after, lr)

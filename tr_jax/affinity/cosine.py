"""Gradient cosine similarity between tasks: the CS baseline of the TAG paper."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tr_jax.affinity.per_task import LossFn, PyTree, per_task_grads
from tr_jax.affinity.strategy import Strategy


def kernel_leaves(grads: PyTree) -> list[jax.Array]:
    """The leaves of a per-task gradient tree (leading axis T) that are kernels: a per-task
    shape of rank > 1 (conv and dense kernels; biases and BatchNorm scales are left out)."""
    return [g for g in jax.tree.leaves(grads) if g.ndim > 2]


def cosine_from_grads(grads: PyTree, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of per-task gradients over their kernel leaves.

    Args:
      grads: per-task gradients, every leaf (T, ...).
      eps: a task whose kernel gradient has norm <= eps gets cosine 0 with every task.

    Returns:
      (T, T) symmetric, C[i, j] = <g_i, g_j> / (|g_i| |g_j|) over the kernel leaves.

    Raises:
      ValueError: if no leaf has a per-task rank > 1.
    """
    leaves = kernel_leaves(grads)
    if not leaves:
        raise ValueError(
            "gradient_cosine found no kernel leaves (per-task rank > 1) in the shared tree; "
            "the CS baseline compares conv/dense kernel gradients only.")
    num_tasks = leaves[0].shape[0]
    flat = jnp.concatenate([g.reshape(num_tasks, -1) for g in leaves], axis=1)
    gram = flat @ flat.T
    norms = jnp.sqrt(jnp.diagonal(gram))
    inv = jnp.where(norms > eps, 1.0 / jnp.maximum(norms, eps), 0.0)
    return gram * inv[:, None] * inv[None, :]


def gradient_cosine(loss_fn: LossFn, shared: PyTree, rest: PyTree, batch: Any, *,
                    strategy: Strategy = "auto", chunk_size: int | None = None,
                    losses_and_grads: tuple[jax.Array, PyTree] | None = None) -> jax.Array:
    """Gradient cosine similarity (CS) of every pair of tasks on one batch.

    Args:
      loss_fn: ``loss_fn(shared, rest, batch) -> (T,)`` per-task losses.
      shared: shared parameters (the encoder); only its kernel leaves (rank > 1) count, as
        in the official CS baseline.
      rest: everything else the loss needs.
      batch: one batch.
      strategy, chunk_size: how :func:`per_task_grads` runs the T backward passes (as for
        :func:`tr_jax.affinity.lookahead_affinity`).
      losses_and_grads: ``(losses, grads)`` from ``per_task_grads`` when the caller has them.

    Returns:
      (T, T) symmetric cosine similarities in [-1, 1], ones on the diagonal (0 for a task
      with a zero kernel gradient).
    """
    if losses_and_grads is None:
        losses_and_grads = per_task_grads(loss_fn, shared, rest, batch, strategy=strategy,
                                          chunk_size=chunk_size)
    return cosine_from_grads(losses_and_grads[1])

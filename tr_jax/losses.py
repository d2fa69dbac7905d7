"""Per-task losses as a (T,) vector, with label masks: a missing label counts nowhere."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def _check_labels(logits: jax.Array, labels: jax.Array, label_mask, lead: int) -> jax.Array:
    if labels.shape != logits.shape[:lead]:
        raise ValueError(
            f"labels must have shape {logits.shape[:lead]} to match logits {logits.shape} "
            f"(batch{', tasks' if lead == 2 else ''}); got {labels.shape}.")
    if label_mask is None:
        return jnp.ones(labels.shape, jnp.float32)
    if label_mask.shape != labels.shape:
        raise ValueError(
            f"label_mask must have the labels' shape {labels.shape}; got {label_mask.shape}.")
    return label_mask.astype(jnp.float32)


def cross_entropy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, logits (..., K) and int labels (...) -> (...)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def per_task_losses(logits: jax.Array, labels: jax.Array,
                    label_mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of each task over the examples that have its label.

    Args:
      logits: (B, T, K).
      labels: int (B, T).
      label_mask: optional bool/float (B, T); False/0 = label missing.

    Returns:
      (T,) losses; a task with no label in the batch has loss 0.
    """
    chex.assert_rank(logits, 3)
    mask = _check_labels(logits, labels, label_mask, 2)
    ce = cross_entropy_per_example(logits, labels) * mask
    return ce.sum(0) / jnp.maximum(mask.sum(0), 1.0)


def routed_losses(logits: jax.Array, labels: jax.Array, task, num_tasks: int,
                  label_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Loss of examples each routed through one task.

    Args:
      logits: (B, K), example b routed through task ``task`` (scalar) or ``task[b]`` ((B,)).
      labels: int (B, T), all tasks' labels; the routed task's column is used.
      task: int scalar or (B,) ints.
      num_tasks: T.
      label_mask: optional (B, T).

    Returns:
      (total, per_task): the mean loss over labelled examples (scalar) and each task's mean
      over its own labelled examples, (T,) (0 for tasks absent from the batch).
    """
    chex.assert_rank(logits, 2)
    task_ids, weight = _routed_weights(labels, task, num_tasks, label_mask)
    rows = jnp.arange(logits.shape[0])
    ce = cross_entropy_per_example(logits, labels[rows, task_ids]) * weight
    total = ce.sum() / jnp.maximum(weight.sum(), 1.0)
    per_task = (jax.ops.segment_sum(ce, task_ids, num_tasks)
                / jnp.maximum(jax.ops.segment_sum(weight, task_ids, num_tasks), 1.0))
    return total, per_task


def _routed_weights(labels: jax.Array, task, num_tasks: int,
                    label_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(B,) task id of each example and (B,) 1/0: whether it has that task's label."""
    batch = labels.shape[0]
    task_ids = jnp.broadcast_to(jnp.asarray(task), (batch,))
    mask = _check_labels(jnp.zeros((batch, num_tasks, 1)), labels, label_mask, 2)
    return task_ids, mask[jnp.arange(batch), task_ids]


def labelled_tasks(labels: jax.Array, label_mask: jax.Array | None = None,
                   task=None) -> jax.Array:
    """Which tasks have a loss on the batch: (T,) bool, True where a task has at least one
    labelled example (the others' losses are 0 and carry no gradient).

    Args:
      labels: int (B, T).
      label_mask: optional (B, T); False/0 = label missing.
      task: None when every example counts for every task (:func:`per_task_losses`), else the
        task each example is routed through, an int scalar or (B,) (:func:`routed_losses`).
    """
    chex.assert_rank(labels, 2)
    num_tasks = labels.shape[1]
    if task is None:
        return _check_labels(labels, labels, label_mask, 2).sum(0) > 0
    task_ids, weight = _routed_weights(labels, task, num_tasks, label_mask)
    return jax.ops.segment_sum(weight, task_ids, num_tasks) > 0

"""The call convention every tr_jax model follows, and the all-tasks helper.

A model maps ``(x, task, train)`` to logits. Its variables are a dict of collections:
``params`` (``encoder`` -- the shared trunk -- and ``head``), ``batch_stats`` (BatchNorm) and
``routing`` (the fixed masks, never trained).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_jax import routing
from tr_jax.models.heads import MultiTaskHead
from tr_jax.models.layers import RoutingSpec


class MultiTaskModel(nn.Module):
    """Shared encoder (optionally task-routed) + one batched head per task.

    Subclasses implement :meth:`make_encoder`, returning a module named ``"encoder"`` called as
    ``encoder(x, task, train) -> (B, D)``.

    Attributes:
      num_tasks: T.
      sharing: σ in [0, 1] for a routed network; None for a plain shared encoder (no routing
        layers; the task only selects the head).
      scheme: mask scheme, ``"random"`` or ``"partition"``.
      num_classes: K classes per task.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    num_tasks: int
    sharing: float | None = None
    scheme: routing.Scheme = "random"
    num_classes: int = 2
    dtype: Any = None

    input_ndim: int = 4  # rank of x the encoder expects: 4 for (B, H, W, C) images

    @property
    def routed(self) -> bool:
        return self.sharing is not None

    @property
    def routing_spec(self) -> RoutingSpec | None:
        if self.sharing is None:
            return None
        routing.validate_sharing(self.sharing, self.scheme)
        return RoutingSpec(self.num_tasks, self.sharing, self.scheme)

    def make_encoder(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define make_encoder().")

    @nn.compact
    def __call__(self, x: jax.Array, task: routing.TaskIds | None = None,
                 train: bool = False) -> jax.Array:
        """Forward pass.

        Args:
          x: inputs, (B, H, W, C) for image models, (B, ...) for the MLP.
          task: int scalar (one task for the batch), (B,) ints (one per example), or None
            (all tasks; only for unrouted models -- see :func:`apply_all_tasks`).
          train: BatchNorm uses batch statistics (and updates ``batch_stats``) when True.

        Returns:
          (B, K) logits for the routed task(s), or (B, T, K) when ``task`` is None.
        """
        if x.ndim != self.input_ndim and not (self.input_ndim == 2 and x.ndim >= 2):
            raise ValueError(
                f"{type(self).__name__} expects x of rank {self.input_ndim} "
                f"({'(B, H, W, C)' if self.input_ndim == 4 else '(B, features...)'}); "
                f"got shape {x.shape}.")
        if task is None and self.routed:
            raise ValueError(
                "task=None (all tasks) needs one forward per task on a routed model: use "
                "tr_jax.models.apply_all_tasks(model, variables, x).")
        if task is not None:
            routing.check_task_ids(task, self.num_tasks, x.shape[0])
        features = self.make_encoder()(x, task, train)
        return MultiTaskHead(self.num_tasks, self.num_classes, self.dtype, name="head")(
            features, task)


def apply_all_tasks(model: MultiTaskModel, variables: dict, x: jax.Array, *,
                    train: bool = False, chunk_size: int | None = None,
                    rngs: dict | None = None) -> tuple[jax.Array, Any]:
    """Logits of every task for every example.

    Unrouted models need one forward. Routed models run the trunk once per task: vmapped over
    all tasks, or with ``chunk_size`` vmapped inside chunks of that many tasks that
    ``jax.lax.map`` runs one after the other (bounds memory at T = 312).

    Args:
      model: a :class:`MultiTaskModel`.
      variables: its variables (``params``, ``routing``, optional ``batch_stats``).
      x: inputs (B, ...).
      train: BatchNorm in training mode; the updated ``batch_stats`` are returned (for routed
        models: averaged over the per-task forwards).
      chunk_size: tasks per vmapped chunk for routed models (None: all tasks at once).
      rngs: optional RNG streams (e.g. dropout).

    Returns:
      (logits (B, T, K), new batch_stats or None).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tasks per chunk) or None.")
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False

    def forward(task):
        out = model.apply(variables, x, task, train, mutable=mutable, rngs=rngs)
        return out if mutable else (out, None)

    if not model.routed:
        logits, updates = forward(None)
    else:
        tasks = jnp.arange(model.num_tasks)
        if chunk_size is None or chunk_size >= model.num_tasks:
            logits, updates = jax.vmap(forward)(tasks)
        else:
            logits, updates = jax.lax.map(forward, tasks, batch_size=chunk_size)
        logits = jnp.moveaxis(logits, 0, 1)
        if updates is not None:
            updates = jax.tree.map(lambda a: a.mean(0), updates)
    return logits, (updates["batch_stats"] if updates else None)

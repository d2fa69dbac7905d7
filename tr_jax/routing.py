"""Task Routing (Strezoski et al., ICCV 2019): fixed per-task binary channel masks.

A Task Routing Layer multiplies activations channel-wise by the active task's mask row:
``y = x * m[t]`` with ``m`` of shape ``(T, C)``. Masks are drawn once from a PRNG key and are
never trained: :class:`TaskRouting` keeps them in the ``"routing"`` variable collection, which
the optimizer never sees and checkpoints keep.

Sharing ratio ``sharing`` (σ in the paper) is the fraction of a task's units that it shares:
σ = 1 is a fully shared network (all-ones masks), σ = 0 no sharing.

Two schemes:

* ``"random"`` -- the official PyTorch code (``taskrouting.py``): every task independently zeroes
  ``int(C * (1 - σ))`` units chosen uniformly at random. The official argument ``sigma`` is the
  fraction *zeroed*, i.e. ``official_sigma = 1 - sharing``.
* ``"partition"`` -- the paper's endpoint semantics: ``round(σ C)`` units are shared by all tasks
  and the remaining units are dealt out so that each is task-specific; when there are more tasks
  than free units, each free unit serves a balanced subset of tasks. σ = 0 gives disjoint
  sub-networks.
"""
from __future__ import annotations

from typing import Literal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Scheme = Literal["random", "partition"]
SCHEMES = ("random", "partition")
ROUTING = "routing"  # name of the non-trainable variable collection holding the masks
# Task ids: an int scalar (one task for the whole batch) or an int array (B,) (one per example).
TaskIds = int | jax.Array

# Guards int(C * (1 - σ)) against float error, e.g. (1 - 0.9) * 10 = 0.99999... -> 1, not 0.
_EPS = 1e-9


def validate_sharing(sharing: float, scheme: str = "random") -> None:
    """Raises ValueError unless ``sharing`` is in [0, 1] and ``scheme`` is known."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; use one of {SCHEMES}.")
    if not 0.0 <= float(sharing) <= 1.0:
        raise ValueError(
            f"sharing={sharing} is outside [0, 1]: it is the fraction of a task's units that are "
            "shared (1 = fully shared network, 0 = no sharing).")


def num_zeroed(num_units: int, sharing: float) -> int:
    """Units each task zeroes under the ``"random"`` scheme: ``int(C * (1 - σ))``."""
    return int(num_units * (1.0 - float(sharing)) + _EPS)


def make_masks(key: chex.PRNGKey, num_tasks: int, num_units: int, sharing: float,
               scheme: Scheme = "random") -> jax.Array:
    """Draws the fixed binary routing masks of one layer.

    Args:
      key: PRNG key; the masks are a pure, deterministic function of it.
      num_tasks: T, number of tasks (>= 1).
      num_units: C, number of channels of the routed activation (>= 1).
      sharing: σ in [0, 1], the fraction of a task's units it shares with others.
      scheme: ``"random"`` (official code) or ``"partition"`` (paper endpoints).

    Returns:
      float32 array of shape (T, C) with values in {0, 1}.

    Raises:
      ValueError: on σ outside [0, 1], an unknown scheme, non-positive sizes, or a ``"random"``
        σ that leaves a task no unit.
    """
    validate_sharing(sharing, scheme)
    if num_tasks < 1 or num_units < 1:
        raise ValueError(f"num_tasks={num_tasks} and num_units={num_units} must both be >= 1.")
    if scheme == "random":
        return _random_masks(key, num_tasks, num_units, sharing)
    return _partition_masks(key, num_tasks, num_units, sharing)


def _random_masks(key, num_tasks, num_units, sharing):
    off = num_zeroed(num_units, sharing)
    if off >= num_units:
        raise ValueError(
            f"sharing={sharing} with the 'random' scheme zeroes int({num_units} * (1 - {sharing})) "
            f"= {off} of {num_units} units, leaving a task no unit. Use a larger sharing, or "
            "scheme='partition' for disjoint task-specific sub-networks at sharing=0.")
    ranks = jax.vmap(lambda k: jax.random.permutation(k, num_units))(
        jax.random.split(key, num_tasks))
    return (ranks >= off).astype(jnp.float32)


def _partition_masks(key, num_tasks, num_units, sharing):
    shared = int(round(float(sharing) * num_units))
    k_units, k_tasks = jax.random.split(key)
    units = jax.random.permutation(k_units, num_units)
    tasks = jax.random.permutation(k_tasks, num_tasks)
    masks = jnp.zeros((num_tasks, num_units), jnp.float32).at[:, units[:shared]].set(1.0)
    free = num_units - shared
    # Deal free units and tasks round-robin over max(T, F) slots: with T <= F every unit is
    # task-specific and tasks get F // T or F // T + 1 units; with T > F every task gets one
    # unit and each unit serves T // F or T // F + 1 tasks.
    if free:
        slots = np.arange(max(num_tasks, free))
        masks = masks.at[tasks[slots % num_tasks], units[shared + slots % free]].set(1.0)
    return masks


def check_task_ids(task: TaskIds, num_tasks: int, batch_size: int | None = None) -> None:
    """Validates task ids: a scalar or a (B,) integer array in [0, num_tasks).

    Shape and dtype are always checked; values only when they are concrete, i.e. outside
    ``jit`` (the training loop checks every batch's ids on the host, ``train.check_batch``).
    Under ``jit`` the ids are traced and go unchecked: JAX's indexing (the routing masks'
    rows, the heads' columns) then silently maps an out-of-range id into range, negative ids
    counting from the end as in NumPy and the rest clamped to [0, num_tasks - 1].
    """
    shape = np.shape(task)
    if len(shape) > 1 or (len(shape) == 1 and batch_size is not None and shape[0] != batch_size):
        raise ValueError(
            f"task must be an int scalar or an int array of shape (B,)=({batch_size},); "
            f"got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(task), jnp.integer):
        raise TypeError(f"task ids must be integers, got dtype {jnp.result_type(task)}.")
    if isinstance(task, jax.core.Tracer):
        return
    values = np.asarray(task)
    if values.size and (values.min() < 0 or values.max() >= num_tasks):
        raise ValueError(
            f"task ids must lie in [0, {num_tasks}) for num_tasks={num_tasks}; got values in "
            f"[{values.min()}, {values.max()}].")


class TaskRouting(nn.Module):
    """Task Routing Layer: multiplies ``x`` channel-wise by the active task's fixed mask.

    Masks live in the ``"routing"`` collection and are drawn at ``init`` from the ``"routing"``
    RNG stream (so they do not depend on parameter initialisation; each layer folds in its own
    path, so layers are independent). If no ``"routing"`` stream is given at init, the
    ``"params"`` stream is used instead.

    Task ids are range-checked only outside ``jit`` (see :func:`check_task_ids`); under
    ``jit`` JAX's indexing clamps an out-of-range id into range without an error.

    Attributes:
      num_tasks: T.
      sharing: σ in [0, 1].
      scheme: ``"random"`` or ``"partition"``.
    """

    num_tasks: int
    sharing: float
    scheme: Scheme = "random"

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds) -> jax.Array:
        """Routes ``x``.

        Args:
          x: activations (B, ..., C).
          task: int scalar (one task for the whole batch) or int array (B,) (one per example).

        Returns:
          ``x`` multiplied by the mask rows, same shape and dtype as ``x``.
        """
        validate_sharing(self.sharing, self.scheme)
        check_task_ids(task, self.num_tasks, x.shape[0])
        channels = x.shape[-1]

        def init_masks():
            stream = ROUTING if self.has_rng(ROUTING) else "params"
            return make_masks(self.make_rng(stream), self.num_tasks, channels, self.sharing,
                              self.scheme)

        masks = self.variable(ROUTING, "masks", init_masks).value
        chex.assert_shape(masks, (self.num_tasks, channels))
        rows = masks[task].astype(x.dtype)
        if jnp.ndim(task) == 1:
            rows = rows.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (channels,))
        return x * rows

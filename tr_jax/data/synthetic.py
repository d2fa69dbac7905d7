"""Synthetic multi-task data with planted task groups: the right grouping is known.

Inputs are Gaussian vectors x ~ N(0, I_D). Each group g owns ``factors`` latent directions
U_g (D, r), orthonormal and orthogonal to every other group's, and a prototype a_g in R^r.
Task t of group g reads the group's latent factors z = U_g^T x with its own weights
a_t = a_g + ``spread`` * ε_t and labels y_t = 1[a_t · z + noise > 0]:

- tasks of one group share latent factors and nearly the same decision rule, so a step on one
  lowers the others' losses (positive TAG affinity);
- tasks of different groups read orthogonal factors of the same inputs, so they only compete
  for the shared encoder's capacity (affinity near zero or negative).

Task ids are shuffled so that groups are not contiguous blocks.
"""
from __future__ import annotations

import numpy as np

from tr_jax.data.base import ArrayDataset


def _check(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def load_synthetic(num_groups: int = 3, tasks_per_group: int = 3, *, dim: int = 32,
                   factors: int = 2, spread: float = 0.3, label_noise: float = 0.1,
                   num_train: int = 2048, num_test: int = 512, seed: int = 0) -> ArrayDataset:
    """A synthetic multi-task set with ``num_groups`` planted groups of related tasks.

    Args:
      num_groups: G groups.
      tasks_per_group: tasks in each group (T = G * tasks_per_group).
      dim: input dimension D; needs D >= G * factors.
      factors: latent directions per group, r.
      spread: how far a task's decision rule strays from its group's prototype (0: all
        tasks of a group identical).
      label_noise: standard deviation of the Gaussian noise added to the task score before
        thresholding, relative to the score's own scale (about 1).
      num_train: training examples.
      num_test: test examples.
      seed: everything is deterministic in the seed.

    Returns:
      ArrayDataset "synthetic" with splits "train"/"test" ({"image": float32 (N, D),
      "labels": int32 (N, T), "label_mask": bool (N, T) all True}), ``task_names``
      ``"g{group}_t{k}"`` and ``groups``: the planted grouping, a tuple of G sorted tuples of
      task ids.
    """
    for name, value, low in (("num_groups", num_groups, 1), ("tasks_per_group", tasks_per_group, 1),
                             ("dim", dim, 1), ("factors", factors, 1), ("num_train", num_train, 1),
                             ("num_test", num_test, 1)):
        _check(name, value, low)
    if dim < num_groups * factors:
        raise ValueError(f"dim={dim} is too small for {num_groups} groups of {factors} "
                         f"orthogonal factors: need dim >= {num_groups * factors}.")
    rng = np.random.default_rng(seed)
    num_tasks = num_groups * tasks_per_group
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    directions = basis[:, :num_groups * factors].reshape(dim, num_groups, factors)
    prototypes = rng.standard_normal((num_groups, factors))
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    weights = (prototypes[:, None] + spread * rng.standard_normal(
        (num_groups, tasks_per_group, factors)))
    weights /= np.linalg.norm(weights, axis=2, keepdims=True)          # (G, k, r)
    # task id of (group g, member k): a shuffled layout so groups are not blocks
    task_id = rng.permutation(num_tasks).reshape(num_groups, tasks_per_group)

    def split(n: int) -> dict[str, np.ndarray]:
        x = rng.standard_normal((n, dim))
        scores = np.einsum("nd,dgr,gkr->ngk", x, directions, weights)
        scores = scores + label_noise * rng.standard_normal(scores.shape)
        labels = np.empty((n, num_tasks), np.int32)
        labels[:, task_id.reshape(-1)] = (scores.reshape(n, -1) > 0)
        return {"image": x.astype(np.float32), "labels": labels,
                "label_mask": np.ones((n, num_tasks), bool)}

    splits = {"train": split(num_train), "test": split(num_test)}
    names = [""] * num_tasks
    for g in range(num_groups):
        for k in range(tasks_per_group):
            names[task_id[g, k]] = f"g{g}_t{k}"
    groups = tuple(sorted(tuple(sorted(int(t) for t in task_id[g])) for g in range(num_groups)))
    return ArrayDataset("synthetic", tuple(names), splits, groups)

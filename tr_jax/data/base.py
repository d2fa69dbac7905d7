"""In-memory multi-task datasets and their batch iterator.

Every tr_jax data source yields batches as dicts of numpy arrays:
``{"image": float32 (B, ...), "labels": int32 (B, T), "label_mask": bool (B, T)}``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

Batch = Mapping[str, np.ndarray]
TaskSpec = int | Sequence[str | int] | None


def check_start(start: int) -> None:
    """Raises unless ``start``, the index of an epoch's first batch to yield, is >= 0."""
    if start < 0:
        raise ValueError(f"start={start} must be >= 0: the index of the first batch to yield "
                         "in the epoch.")


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A multi-task dataset held in memory.

    Attributes:
      name: dataset name.
      task_names: the T task names, in label-column order.
      splits: split name -> {"image": (N, ...), "labels": int32 (N, T),
        "label_mask": bool (N, T)}.
      groups: planted ground-truth task groups, when the data has them (synthetic sets).
    """

    name: str
    task_names: tuple[str, ...]
    splits: Mapping[str, Mapping[str, np.ndarray]]
    groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        for split, arrays in self.splits.items():
            n, t = arrays["labels"].shape
            if t != len(self.task_names):
                raise ValueError(f"{self.name}/{split}: labels have {t} columns for "
                                 f"{len(self.task_names)} task names.")
            for key, value in arrays.items():
                if len(value) != n:
                    raise ValueError(f"{self.name}/{split}: {key!r} has {len(value)} rows, "
                                     f"labels have {n}.")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def num_examples(self, split: str) -> int:
        return len(self._split(split)["labels"])

    def _split(self, split: str) -> Mapping[str, np.ndarray]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} is unknown for {self.name}; "
                           f"available: {sorted(self.splits)}.")
        return self.splits[split]

    def steps_per_epoch(self, split: str, batch_size: int, drop_remainder: bool = True) -> int:
        n = self.num_examples(split)
        return n // batch_size if drop_remainder else -(-n // batch_size)

    def batches(self, split: str, batch_size: int, *, epoch: int = 0, seed: int = 0,
                shuffle: bool = True, drop_remainder: bool = True,
                start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields the batches of one epoch, deterministic in (seed, epoch).

        Args:
          split: e.g. "train" or "test".
          batch_size: B.
          epoch: epoch index (changes the shuffle order).
          seed: data seed.
          shuffle: shuffle examples (train) or keep file order (eval).
          drop_remainder: drop the last incomplete batch.
          start: index of the first batch to yield (to resume inside an epoch).
        """
        arrays = self._split(split)
        n = len(arrays["labels"])
        if batch_size < 1 or (drop_remainder and batch_size > n):
            raise ValueError(f"batch_size={batch_size} must be in [1, {n}] for "
                             f"{self.name}/{split} ({n} examples).")
        check_start(start)
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        for b in range(start, self.steps_per_epoch(split, batch_size, drop_remainder)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield {k: v[idx] for k, v in arrays.items()}


def resolve_tasks(task_names: Sequence[str], tasks: TaskSpec = None) -> tuple[int, ...]:
    """Indices (into ``task_names``) of the chosen tasks, in the chosen order.

    Args:
      task_names: all task names of a dataset, in label-column order.
      tasks: ``None`` for all tasks; an int ``N`` for the first ``N``; or a sequence of task
        names and/or indices, kept in the given order.

    Returns:
      Tuple of distinct indices into ``task_names``.
    """
    total = len(task_names)
    if tasks is None:
        return tuple(range(total))
    if isinstance(tasks, (int, np.integer)):
        if not 1 <= tasks <= total:
            raise ValueError(f"tasks={tasks} must be in [1, {total}] (first-N tasks).")
        return tuple(range(int(tasks)))
    if isinstance(tasks, str):
        raise TypeError(f"tasks={tasks!r} must be a sequence of names, not one string: "
                        f"write tasks=[{tasks!r}].")
    index = []
    for task in tasks:
        if isinstance(task, str):
            if task not in task_names:
                raise KeyError(f"unknown task {task!r}; known tasks: {tuple(task_names)}.")
            index.append(task_names.index(task))
        elif not 0 <= int(task) < total:
            raise KeyError(f"task index {task} outside [0, {total}).")
        else:
            index.append(int(task))
    if not index or len(set(index)) != len(index):
        raise ValueError(f"tasks={tuple(tasks)!r} must be non-empty and without repeats.")
    return tuple(index)


def _subset_groups(groups: tuple[tuple[int, ...], ...] | None,
                   index: Sequence[int]) -> tuple[tuple[int, ...], ...] | None:
    """``groups`` renumbered to the kept columns ``index``: each group keeps its kept tasks
    (sorted new ids) and a group with none left is dropped."""
    if groups is None:
        return None
    new_id = {old: new for new, old in enumerate(index)}
    kept = (tuple(sorted(new_id[t] for t in g if t in new_id)) for g in groups)
    return tuple(g for g in kept if g)


def task_subset(dataset: ArrayDataset, tasks: TaskSpec) -> ArrayDataset:
    """Keeps the chosen tasks, in the chosen order (``tasks`` as in :func:`resolve_tasks`).

    Planted ``groups`` follow the columns: each group keeps its chosen tasks under their new
    ids, and groups with no chosen task are dropped.
    """
    index = resolve_tasks(dataset.task_names, tasks)
    splits = {s: {k: (v[:, index] if k in ("labels", "label_mask") else v)
                  for k, v in arrays.items()} for s, arrays in dataset.splits.items()}
    return dataclasses.replace(dataset, task_names=tuple(dataset.task_names[i] for i in index),
                               splits=splits, groups=_subset_groups(dataset.groups, index))

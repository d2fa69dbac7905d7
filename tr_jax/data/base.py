"""In-memory multi-task datasets and their batch iterator.

Every tr_jax data source yields batches as dicts of numpy arrays:
``{"image": float32 (B, ...), "labels": int32 (B, T), "label_mask": bool (B, T)}``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import numpy as np

Batch = Mapping[str, np.ndarray]


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
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        for b in range(start, self.steps_per_epoch(split, batch_size, drop_remainder)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield {k: v[idx] for k, v in arrays.items()}


def task_subset(dataset: ArrayDataset, tasks) -> ArrayDataset:
    """Keeps the tasks named (or indexed) in ``tasks``, in that order."""
    index = []
    for t in tasks:
        if isinstance(t, str):
            if t not in dataset.task_names:
                raise KeyError(f"unknown task {t!r}; {dataset.name} has {dataset.task_names}.")
            index.append(dataset.task_names.index(t))
        else:
            if not 0 <= int(t) < dataset.num_tasks:
                raise KeyError(f"task index {t} outside [0, {dataset.num_tasks}).")
            index.append(int(t))
    splits = {s: {k: (v[:, index] if k in ("labels", "label_mask") else v)
                  for k, v in arrays.items()} for s, arrays in dataset.splits.items()}
    return dataclasses.replace(dataset, task_names=tuple(dataset.task_names[i] for i in index),
                               splits=splits, groups=None)

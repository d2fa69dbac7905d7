"""Shared TFDS input pipeline for the real multi-task datasets (CelebA, CUB-200-2011).

One place for what every TFDS-backed source needs: choosing a task subset, opening a prepared
TFDS builder (never downloading), sharding a split across JAX processes, seeded shuffling,
image decoding/resizing, optional random flips, batching and prefetching, and conversion to
numpy. A :class:`TFDSTaskDataset` has the same interface as
:class:`tr_jax.data.base.ArrayDataset` (``task_names``, ``num_tasks``, ``num_examples``,
``steps_per_epoch``, ``batches``), so the train loop consumes both alike.

Batches are dicts of numpy arrays::

    {"image": float32 (B, H, W, 3) in [0, 1],   # bilinear resize, divided by 255
     "labels": int32 (B, T) in {0, 1},
     "label_mask": bool (B, T)}                  # True = label present and usable

TensorFlow is imported lazily (inside functions) so that ``import tr_jax`` stays fast, and it
is kept off any GPU/TPU so it never takes accelerator memory from JAX.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from tr_jax.data.base import TaskSpec, check_start, resolve_tasks  # noqa: F401 (public here too)

# example (dict of tf.Tensor) -> (labels (T_all,) bool or int, label_mask (T_all,) bool)
LabelFn = Callable[[Mapping[str, Any]], tuple[Any, Any]]


@functools.cache
def tensorflow() -> types.ModuleType:
    """Imports TensorFlow once, hiding accelerators from it (JAX owns them); returns ``tf``."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialized its devices elsewhere; leave them be
        pass
    return tf


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this JAX process; ``None`` reads ``jax.process_index/count()``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return process_index, process_count


@dataclasses.dataclass(frozen=True)
class TFDSTaskDataset:
    """A multi-task dataset read from a prepared TFDS builder.

    Build it with :func:`open_tfds_dataset` (or ``load_celeba`` / ``load_cub``).

    Attributes:
      name: dataset name.
      task_names: the T chosen task names, in label-column order.
      builder: the prepared ``tfds.core.DatasetBuilder``.
      split_specs: split name -> TFDS split string (e.g. ``"train"``, ``"train[:90%]"``).
      label_fn: example -> (labels, mask) over all of the dataset's tasks.
      task_index: (T,) columns of ``label_fn``'s output kept, in order.
      image_size: (H, W) of the yielded images.
      augment: random horizontal flips on the ``"train"`` split.
      process_index: this process's shard of every split.
      process_count: number of shards (JAX processes).
      shuffle_buffer: examples in the shuffle buffer (encoded images, ~10 KB each).
      sizes: split name -> (examples in the split, examples in this process's shard). Shards
        are equal (up to ``process_count - 1`` examples of a split are dropped), so every
        process runs the same number of steps, in training and in evaluation.
      groups: planted task groups (none for real data; kept for ArrayDataset parity).
    """

    name: str
    task_names: tuple[str, ...]
    builder: Any
    split_specs: Mapping[str, str]
    label_fn: LabelFn
    task_index: tuple[int, ...]
    image_size: tuple[int, int]
    augment: bool
    process_index: int
    process_count: int
    shuffle_buffer: int
    sizes: Mapping[str, tuple[int, int]]
    groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def num_examples(self, split: str) -> int:
        """Examples in the whole split (all processes)."""
        return self._sizes(split)[0]

    def local_batch_size(self, batch_size: int) -> int:
        """Rows per batch on this process: the global ``batch_size`` / process count."""
        if batch_size < 1 or batch_size % self.process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"process count {self.process_count}.")
        return batch_size // self.process_count

    def steps_per_epoch(self, split: str, batch_size: int, drop_remainder: bool = True) -> int:
        """Batches per epoch; identical on every process (shards have equal sizes)."""
        local, per_batch = self._sizes(split)[1], self.local_batch_size(batch_size)
        return local // per_batch if drop_remainder else -(-local // per_batch)

    def batches(self, split: str, batch_size: int, *, epoch: int = 0, seed: int = 0,
                shuffle: bool = True, drop_remainder: bool = True,
                start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's numpy batches of one epoch, deterministic in (seed, epoch).

        Args:
          split: a key of ``split_specs`` (e.g. "train", "validation", "test").
          batch_size: global batch size; each process yields ``batch_size / process_count``
            rows (its slice of the global batch).
          epoch: epoch index (changes the shuffle order and the flips).
          seed: data seed.
          shuffle: shuffle files and examples (train) or keep the stored order (eval).
          drop_remainder: drop the last incomplete batch.
          start: index of the first batch to yield (to resume inside an epoch); skipped
            examples are not decoded.

        Yields:
          {"image": float32 (b, H, W, 3), "labels": int32 (b, T), "label_mask": bool (b, T)}
          with b = batch_size / process_count (smaller for a kept last batch).
        """
        import tensorflow_datasets as tfds

        tf = tensorflow()
        check_start(start)
        per_batch = self.local_batch_size(batch_size)
        local = self._sizes(split)[1]
        if drop_remainder and per_batch > local:
            raise ValueError(f"batch_size={batch_size} gives {per_batch} rows per process, more "
                             f"than the {local} examples of {self.name}/{split} on this process.")
        file_seed, example_seed, flip_seed = (
            int(s) for s in np.random.SeedSequence([seed, epoch]).generate_state(3))
        ds = self.builder.as_dataset(
            split=self._shard(split), shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=file_seed),
            decoders={"image": tfds.decode.SkipDecoding()})
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=example_seed)
        ds = ds.enumerate().skip(start * per_batch)
        flip = self.augment and split == "train"
        ds = ds.map(functools.partial(self._parse, flip_seed=flip_seed if flip else None),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(per_batch, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True  # parallel reads and maps keep their order
        yield from tfds.as_numpy(ds.with_options(options))

    def _sizes(self, split: str) -> tuple[int, int]:
        if split not in self.sizes:
            raise KeyError(f"split {split!r} is unknown for {self.name}; "
                           f"available: {sorted(self.sizes)}.")
        return self.sizes[split]

    def _shard(self, split: str):
        import tensorflow_datasets as tfds

        return tfds.split_for_jax_process(self.split_specs[split],
                                          process_index=self.process_index,
                                          process_count=self.process_count,
                                          drop_remainder=True)

    def _parse(self, position, example, *, flip_seed: int | None):
        """Encoded example -> {"image", "labels", "label_mask"} for the chosen tasks."""
        tf = tensorflow()
        image = self.builder.info.features["image"].decode_example(example["image"])
        image = tf.image.resize(image, self.image_size) / 255.0
        if flip_seed is not None:
            image = tf.image.stateless_random_flip_left_right(
                image, seed=tf.stack([tf.constant(flip_seed, tf.int64), position]))
        labels, mask = self.label_fn(example)
        index = tf.constant(self.task_index, tf.int32)
        return {"image": image,
                "labels": tf.cast(tf.gather(labels, index), tf.int32),
                "label_mask": tf.cast(tf.gather(mask, index), tf.bool)}


def open_tfds_dataset(builder, *, all_task_names: Sequence[str], task_index: Sequence[int],
                      label_fn: LabelFn, split_specs: Mapping[str, str],
                      image_size: tuple[int, int], augment: bool, shuffle_buffer: int,
                      process_index: int | None, process_count: int | None,
                      not_prepared_help: str, name: str | None = None) -> TFDSTaskDataset:
    """Wraps a prepared TFDS builder as a :class:`TFDSTaskDataset`.

    Args:
      builder: a ``tfds.core.DatasetBuilder`` whose data should already be prepared.
      all_task_names: names of the columns ``label_fn`` returns.
      task_index: (T,) columns of ``label_fn``'s output to keep (see :func:`resolve_tasks`).
      label_fn: example -> (labels (T_all,), label_mask (T_all,)) as tf tensors.
      split_specs: split name -> TFDS split string.
      image_size: (H, W) after resizing.
      augment: random horizontal flips on the "train" split.
      shuffle_buffer: shuffle buffer size in examples.
      process_index, process_count: shard of this process; ``None`` asks JAX.
      not_prepared_help: the message of the FileNotFoundError raised when the builder's
        data is absent (say where it was looked for and how to prepare it).
      name: dataset name (default: the builder's).

    Returns:
      The dataset, with split sizes read from the prepared data.
    """
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size={tuple(image_size)} must be two positive ints (H, W).")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1.")
    process_index, process_count = process_shard(process_index, process_count)
    try:
        totals = {split: int(builder.as_dataset(split=spec).cardinality())
                  for split, spec in split_specs.items()}
    except AssertionError as err:  # TFDS: "could not find data in <data_dir>"
        raise FileNotFoundError(not_prepared_help) from err
    index = tuple(int(i) for i in task_index)
    return TFDSTaskDataset(
        name=name or builder.name, task_names=tuple(all_task_names[i] for i in index),
        builder=builder, split_specs=dict(split_specs), label_fn=label_fn, task_index=index,
        image_size=(height, width), augment=augment, process_index=process_index,
        process_count=process_count, shuffle_buffer=shuffle_buffer,
        # tfds.even_splits(..., drop_remainder=True) gives every process n // count examples
        sizes={split: (n, n // process_count) for split, n in totals.items()})

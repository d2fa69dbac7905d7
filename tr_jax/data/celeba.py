"""CelebA (TFDS ``celeb_a``): the 40 binary face attributes as tasks.

The official train (162,770) / validation (19,867) / test (19,962) splits; images resized
(bilinear) from 218x178 to 64x64 by default and scaled to [0, 1], as in the TAG CelebA study.
Task names are the TFDS attribute feature names (``5_o_Clock_Shadow`` ... ``Young``, the
column order of ``list_attr_celeba.txt``). Every label is present (``label_mask`` all True).

tr_jax never downloads at run time: prepare the dataset once with TFDS on a machine with
internet (:func:`prepare_celeba`) and pass ``data_dir=DIR``.
"""
from __future__ import annotations

from typing import Mapping

from tr_jax.data.pipeline import (TaskSpec, TFDSTaskDataset, open_tfds_dataset, resolve_tasks,
                                  tensorflow)

# The 9 attributes of the official TAG CelebA study (Fifty et al., NeurIPS 2021).
TAG_TASKS: tuple[str, ...] = ("5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair",
                              "Goatee", "Mustache", "No_Beard", "Rosy_Cheeks", "Wearing_Hat")
SPLITS: Mapping[str, str] = {"train": "train", "validation": "validation", "test": "test"}


def prepare_celeba(data_dir: str | None = None) -> None:
    """Downloads and prepares TFDS ``celeb_a`` into ``data_dir`` (needs internet; run once).

    Args:
      data_dir: TFDS data directory (``None``: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    import tensorflow_datasets as tfds

    tfds.builder("celeb_a", data_dir=data_dir).download_and_prepare()


def load_celeba(data_dir: str | None = None, *, tasks: TaskSpec = None,
                image_size: tuple[int, int] = (64, 64), augment: bool = False,
                splits: Mapping[str, str] = SPLITS, shuffle_buffer: int = 10_000,
                process_index: int | None = None,
                process_count: int | None = None) -> TFDSTaskDataset:
    """CelebA attribute tasks from a prepared TFDS ``celeb_a``.

    Args:
      data_dir: TFDS data directory holding ``celeb_a/2.1.0``; ``None`` uses TFDS's default
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      tasks: ``None`` (all 40), first-N (int), or names/indices in order; ``TAG_TASKS`` is
        the 9-task subset of the TAG study.
      image_size: (H, W) of the yielded images.
      augment: random horizontal flips on the train split (off by default, as in TAG).
      splits: split name -> TFDS split string (e.g. add ``"train[:10%]"`` subsets).
      shuffle_buffer: shuffle buffer in examples (encoded JPEGs, ~10 KB each).
      process_index, process_count: this process's shard; ``None`` asks JAX.

    Returns:
      TFDSTaskDataset yielding {"image": float32 (B, H, W, 3) in [0, 1], "labels": int32
      (B, T), "label_mask": bool (B, T) all True}.

    Raises:
      FileNotFoundError: when ``celeb_a`` is not prepared in ``data_dir``.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("celeb_a", data_dir=data_dir)
    names = tuple(builder.info.features["attributes"].keys())

    def label_fn(example):
        tf = tensorflow()
        labels = tf.stack([example["attributes"][n] for n in names])
        return labels, tf.ones_like(labels, tf.bool)

    help_text = (
        f"CelebA is not prepared in the TFDS data_dir {str(builder.data_dir_root)!r} (looked "
        f"for {str(builder.data_path)!r}). tr_jax does not download at run time. Prepare it "
        f"once on a machine with internet (it downloads ~1.4 GB from Google Drive and writes "
        f"about as much):"
        f"\n    python -c \"from tr_jax.data.celeba import prepare_celeba; "
        f"prepare_celeba('{builder.data_dir_root}')\"\nthen copy that directory here, or "
        f"pass data_dir= where it already is.")
    return open_tfds_dataset(
        builder, name="celeb_a", all_task_names=names,
        task_index=resolve_tasks(names, tasks), label_fn=label_fn,
        split_specs=splits, image_size=image_size, augment=augment,
        shuffle_buffer=shuffle_buffer, process_index=process_index,
        process_count=process_count, not_prepared_help=help_text)

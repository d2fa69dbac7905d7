"""CUB-200-2011 with its 312 binary attributes as tasks (the Task Routing paper's dataset).

TFDS's ``caltech_birds2011`` carries no attributes, so tr_jax ships its own TFDS builder
(:mod:`tr_jax.data.cub_builder`, dataset ``cub2011_attributes``) that reads a manually
downloaded ``CUB_200_2011/`` directory once into TFRecords; :func:`load_cub` then serves it
through the shared pipeline (:mod:`tr_jax.data.pipeline`).

Labels: ``is_present`` of every (image, attribute) pair, with the annotator's certainty
(``attributes/certainties.txt``: 1 not visible, 2 guessing, 3 probably, 4 definitely). The
``not_visible`` policy decides what "not visible" means for training: ``"keep"`` uses the
label as annotated (almost always 0), ``"mask"`` sets ``label_mask`` False there. Pairs with no
annotation line are always masked.

Task subsets: the TR paper reports 20, 40, 100 and 312 tasks without (as far as we found)
listing which attributes form the smaller sets. tr_jax makes the choice explicit and
deterministic: ``tasks=N`` with ``task_order="id"`` (default) takes the first N attribute ids
of ``attributes.txt``; ``task_order="frequency"`` takes the N attributes most often present
among the *train* images (ties broken by attribute id), computed when the dataset is prepared.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Mapping

import numpy as np

from tr_jax.data.pipeline import (TaskSpec, TFDSTaskDataset, open_tfds_dataset, resolve_tasks,
                                  tensorflow)

NUM_ATTRIBUTES = 312
NUM_CLASSES = 200
SUBSET_SIZES: tuple[int, ...] = (20, 40, 100, 312)  # the TR paper's task counts on CUB
SPLITS: Mapping[str, str] = {"train": "train", "test": "test"}
NOT_VISIBLE = "not visible"  # certainty name in attributes/certainties.txt
# attributes/certainties.txt of the official release, ids 1..4; used when the file is absent
CERTAINTY_NAMES = (NOT_VISIBLE, "guessing", "probably", "definitely")
# role -> path under CUB_200_2011/ (attribute names are looked up separately, see below)
REQUIRED_FILES: Mapping[str, str] = {
    "images": "images.txt",
    "split": "train_test_split.txt",
    "classes": "image_class_labels.txt",
    "labels": "attributes/image_attribute_labels.txt",
}
# attributes.txt sits next to CUB_200_2011/ in the official tarball; some copies move it in.
ATTRIBUTE_NAME_FILES = ("attributes/attributes.txt", "attributes.txt", "../attributes.txt")
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download CUB_200_2011.tgz from the "Caltech-UCSD Birds-200-2011" dataset page of the Caltech
Vision Lab (https://www.vision.caltech.edu/datasets/cub_200_2011/) and extract it into the
manual directory, so that it holds:
  CUB_200_2011/images.txt
  CUB_200_2011/train_test_split.txt
  CUB_200_2011/image_class_labels.txt
  CUB_200_2011/attributes/image_attribute_labels.txt
  CUB_200_2011/attributes/certainties.txt      (optional; the official 1-4 if absent)
  CUB_200_2011/images/<class>/<image>.jpg
  attributes.txt  (next to CUB_200_2011/ as in the tarball, or CUB_200_2011/attributes.txt,
                   or CUB_200_2011/attributes/attributes.txt)
The manual directory may also be CUB_200_2011/ itself."""


@dataclasses.dataclass(frozen=True)
class CubAnnotations:
    """The parsed annotation files, images in ascending image-id order.

    Attributes:
      image_ids: int64 (N,) image ids of ``images.txt``.
      file_names: N paths relative to ``CUB_200_2011/images/``.
      is_train: bool (N,) from ``train_test_split.txt``.
      classes: int64 (N,) class index in [0, 200) (``image_class_labels.txt`` minus one).
      attribute_names: the 312 names of ``attributes.txt`` in id order.
      present: bool (N, 312) ``is_present``.
      certainty: uint8 (N, 312) certainty id; 0 where the pair has no annotation line.
      not_visible_certainty: the certainty id meaning "not visible".
      image_dir: the ``CUB_200_2011/images`` directory.
    """

    image_ids: np.ndarray
    file_names: tuple[str, ...]
    is_train: np.ndarray
    classes: np.ndarray
    attribute_names: tuple[str, ...]
    present: np.ndarray
    certainty: np.ndarray
    not_visible_certainty: int
    image_dir: pathlib.Path

    def train_positive_rate(self) -> np.ndarray:
        """float64 (312,): fraction of annotated train images where each attribute is present."""
        annotated = (self.certainty[self.is_train] > 0).sum(0)
        present = (self.present[self.is_train] & (self.certainty[self.is_train] > 0)).sum(0)
        return present / np.maximum(annotated, 1)


def locate_cub(manual_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Finds the annotation files of a manually downloaded CUB-200-2011.

    Args:
      manual_dir: the directory holding ``CUB_200_2011/`` (or ``CUB_200_2011/`` itself).

    Returns:
      role -> path for the roles of ``REQUIRED_FILES`` plus "attribute_names", "image_dir"
      and "certainties" (the latter only when the file exists).

    Raises:
      FileNotFoundError: naming the directory, the missing files and where to get them.
    """
    manual_dir = pathlib.Path(manual_dir).expanduser()
    root = manual_dir / "CUB_200_2011"
    if not root.is_dir() and (manual_dir / "images.txt").exists():
        root = manual_dir
    found = {role: root / rel for role, rel in REQUIRED_FILES.items()}
    found["image_dir"] = root / "images"
    names = [root / rel for rel in ATTRIBUTE_NAME_FILES if (root / rel).is_file()]
    missing = [str(path) for path in found.values() if not path.exists()]
    if not names:
        missing.append(f"attributes.txt (one of {[str(root / r) for r in ATTRIBUTE_NAME_FILES]})")
    if missing:
        raise FileNotFoundError(
            f"CUB-200-2011 is not in the manual directory {str(manual_dir)!r}: missing "
            + ", ".join(missing) + ".\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
    found["attribute_names"] = names[0]
    if (root / "attributes" / "certainties.txt").is_file():
        found["certainties"] = root / "attributes" / "certainties.txt"
    return found


def _rows(path: pathlib.Path, min_fields: int) -> list[list[str]]:
    """Whitespace-split non-empty lines, each with at least ``min_fields`` fields."""
    rows = []
    with path.open() as file:
        for number, line in enumerate(file, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise ValueError(f"{path}:{number}: expected at least {min_fields} fields, "
                                 f"got {line.strip()!r}.")
            rows.append(fields)
    return rows


def _id_column(path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    """int64 (N,) second column of a two-column ``<image_id> <value>`` file, by ``ids``."""
    table = {int(r[0]): int(r[1]) for r in _rows(path, 2)}
    missing = [int(i) for i in ids if int(i) not in table]
    if missing:
        raise ValueError(f"{path}: no line for image ids {missing[:5]} ({len(missing)} in all).")
    return np.array([table[int(i)] for i in ids], np.int64)


def _named_ids(path: pathlib.Path) -> list[str]:
    """Names of an ``<id> <name ...>`` file whose ids run 1..K in order."""
    rows = _rows(path, 2)
    ids = [int(r[0]) for r in rows]
    if ids != list(range(1, len(rows) + 1)):
        raise ValueError(f"{path}: ids must run 1..{len(rows)} in order.")
    return [" ".join(r[1:]) for r in rows]


def _last_occurrences(keys: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each distinct value of ``keys`` (N,), ascending by
    value; fancy assignment with repeated indices leaves unspecified which one wins."""
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    return len(keys) - 1 - first_from_end


def read_cub_annotations(manual_dir: str | pathlib.Path) -> CubAnnotations:
    """Parses the CUB-200-2011 annotation files (pure Python, no TensorFlow).

    ``image_attribute_labels.txt`` lines are ``<image_id> <attribute_id> <is_present>
    <certainty_id> <time>``; a few lines of the official file carry extra fields, so only the
    first four fields are read. A repeated (image, attribute) pair keeps its last line. Without
    ``certainties.txt`` the official certainties (:data:`CERTAINTY_NAMES`) apply.

    Args:
      manual_dir: see :func:`locate_cub`.

    Returns:
      CubAnnotations.
    """
    files = locate_cub(manual_dir)
    images = sorted((int(r[0]), r[1]) for r in _rows(files["images"], 2))
    image_ids = np.array([i for i, _ in images], np.int64)
    names = _named_ids(files["attribute_names"])
    if len(names) != NUM_ATTRIBUTES:
        raise ValueError(f"{files['attribute_names']}: {len(names)} attributes, CUB-200-2011 "
                         f"has {NUM_ATTRIBUTES}.")
    certainties = (_named_ids(files["certainties"]) if "certainties" in files
                   else list(CERTAINTY_NAMES))
    if NOT_VISIBLE not in certainties:
        raise ValueError(f"{files['certainties']}: no {NOT_VISIBLE!r} certainty in {certainties}.")
    classes = _id_column(files["classes"], image_ids) - 1
    if classes.min() < 0 or classes.max() >= NUM_CLASSES:
        raise ValueError(f"{files['classes']}: class ids must be in [1, {NUM_CLASSES}].")

    row_of = {int(i): n for n, i in enumerate(image_ids)}
    labels = np.array([[int(v) for v in r[:4]] for r in _rows(files["labels"], 4)], np.int64)
    image, attribute, present, certainty = labels.T
    bad = ~(np.isin(image, image_ids) & (attribute >= 1) & (attribute <= NUM_ATTRIBUTES)
            & np.isin(present, (0, 1)) & (certainty >= 1) & (certainty <= len(certainties)))
    if bad.any():
        line = int(np.argmax(bad)) + 1
        raise ValueError(f"{files['labels']}: {int(bad.sum())} lines with an unknown image, "
                         f"attribute, is_present or certainty id (first: line ~{line}: "
                         f"{labels[line - 1].tolist()}).")
    rows = np.array([row_of[int(i)] for i in image], np.int64)
    last = _last_occurrences(rows * NUM_ATTRIBUTES + attribute - 1)
    rows, attribute, present, certainty = (a[last] for a in (rows, attribute, present, certainty))
    present_table = np.zeros((len(image_ids), NUM_ATTRIBUTES), bool)
    certainty_table = np.zeros((len(image_ids), NUM_ATTRIBUTES), np.uint8)
    present_table[rows, attribute - 1] = present.astype(bool)
    certainty_table[rows, attribute - 1] = certainty
    return CubAnnotations(
        image_ids=image_ids, file_names=tuple(name for _, name in images),
        is_train=_id_column(files["split"], image_ids).astype(bool), classes=classes,
        attribute_names=tuple(names), present=present_table, certainty=certainty_table,
        not_visible_certainty=certainties.index(NOT_VISIBLE) + 1, image_dir=files["image_dir"])


def _builder(data_dir: str | None):
    from tr_jax.data.cub_builder import Cub2011Attributes

    return Cub2011Attributes(data_dir=data_dir)


def prepare_cub(manual_dir: str | pathlib.Path, data_dir: str | None = None) -> None:
    """Converts a manually downloaded CUB-200-2011 into the TFDS dataset (once, offline).

    Args:
      manual_dir: the directory holding ``CUB_200_2011/`` (see :func:`locate_cub`).
      data_dir: TFDS data directory to write ``cub2011_attributes/`` into (``None``: TFDS's
        default).
    """
    import tensorflow_datasets as tfds

    locate_cub(manual_dir)  # the clear error before TFDS's generic one
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir),
                                          compute_stats=tfds.download.ComputeStatsMode.SKIP)
    _builder(data_dir).download_and_prepare(download_config=config)


def load_cub(data_dir: str | None = None, *, tasks: TaskSpec = None,
             task_order: Literal["id", "frequency"] = "id",
             not_visible: Literal["keep", "mask"] = "keep",
             image_size: tuple[int, int] = (64, 64), augment: bool = False,
             manual_dir: str | pathlib.Path | None = None, splits: Mapping[str, str] = SPLITS,
             shuffle_buffer: int = 10_000, process_index: int | None = None,
             process_count: int | None = None) -> TFDSTaskDataset:
    """CUB-200-2011 attribute tasks from the prepared ``cub2011_attributes`` TFDS dataset.

    Args:
      data_dir: TFDS data directory (``None``: TFDS's default).
      tasks: ``None`` (all 312), an int N (one of ``SUBSET_SIZES`` for the TR paper's
        settings; chosen by ``task_order``), or attribute names/indices in order.
      task_order: how an int ``tasks`` picks attributes: ``"id"`` the first N attribute ids,
        ``"frequency"`` the N most often present among train images (ties: lower id first).
      not_visible: ``"keep"`` trains on "not visible" labels as annotated; ``"mask"`` sets
        their ``label_mask`` False.
      image_size: (H, W); images are resized (bilinear, aspect not kept) and scaled to [0, 1].
      augment: random horizontal flips on the train split.
      manual_dir: if given and the dataset is not prepared yet, prepare it from here first.
      splits: split name -> TFDS split string (official: "train" 5,994, "test" 5,794 images;
        e.g. add ``{"validation": "train[90%:]"}`` and use ``"train[:90%]"`` for train).
      shuffle_buffer: shuffle buffer in examples.
      process_index, process_count: this process's shard; ``None`` asks JAX.

    Returns:
      TFDSTaskDataset yielding {"image": float32 (B, H, W, 3), "labels": int32 (B, T),
      "label_mask": bool (B, T)}.

    Raises:
      FileNotFoundError: when the dataset is not prepared (and no ``manual_dir`` is given),
        or ``manual_dir`` lacks the CUB files.
    """
    if not_visible not in ("keep", "mask"):
        raise ValueError(f"not_visible={not_visible!r} must be 'keep' or 'mask'.")
    if task_order not in ("id", "frequency"):
        raise ValueError(f"task_order={task_order!r} must be 'id' or 'frequency'.")
    builder = _builder(data_dir)
    help_text = (
        f"CUB-200-2011 attributes are not prepared in the TFDS data_dir "
        f"{str(builder.data_dir_root)!r} (looked for {str(builder.data_path)!r}). Prepare "
        f"them once, offline, from the downloaded files: tr_jax.data.cub.prepare_cub("
        f"manual_dir=DIR, data_dir={str(builder.data_dir_root)!r}), or pass manual_dir=DIR "
        f"to load_cub.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
    if not builder.is_prepared():
        if manual_dir is None:
            raise FileNotFoundError(help_text)
        prepare_cub(manual_dir, data_dir)
        builder = _builder(data_dir)
    names = tuple(builder.info.metadata["attribute_names"])
    order = list(range(len(names)))
    if task_order == "frequency" and isinstance(tasks, (int, np.integer)):
        rate = np.asarray(builder.info.metadata["train_positive_rate"])
        order = np.argsort(-rate, kind="stable").tolist()
    index = tuple(order[i] for i in resolve_tasks([names[i] for i in order], tasks))
    not_visible_id = int(builder.info.metadata["not_visible_certainty"])

    def label_fn(example):
        tf = tensorflow()
        certainty = example["certainty"]
        mask = certainty > 0
        if not_visible == "mask":
            mask &= tf.not_equal(certainty, tf.constant(not_visible_id, certainty.dtype))
        return example["attributes"], mask

    return open_tfds_dataset(
        builder, name="cub2011_attributes", all_task_names=names, task_index=index,
        label_fn=label_fn, split_specs=splits, image_size=image_size, augment=augment,
        shuffle_buffer=shuffle_buffer, process_index=process_index,
        process_count=process_count, not_prepared_help=help_text)

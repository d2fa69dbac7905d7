"""Data sources. All yield dict batches {"image", "labels" (B, T), "label_mask" (B, T)}.

Offline: :func:`load_digits` (sklearn's 8x8 digits, 18 attribute tasks) and the planted-group
synthetic tasks (:mod:`tr_jax.data.synthetic`). TFDS: :func:`load_celeba` and
:func:`load_cub` (CUB-200-2011 with its 312 attributes); TensorFlow is imported lazily.
"""
from tr_jax.data import synthetic
from tr_jax.data.base import ArrayDataset, resolve_tasks, task_subset
from tr_jax.data.celeba import TAG_TASKS, load_celeba, prepare_celeba
from tr_jax.data.cub import load_cub, prepare_cub
from tr_jax.data.digits import load_digits
from tr_jax.data.pipeline import TFDSTaskDataset

__all__ = ["TAG_TASKS", "ArrayDataset", "TFDSTaskDataset", "load_celeba", "load_cub",
           "load_digits", "prepare_celeba", "prepare_cub", "resolve_tasks", "synthetic",
           "task_subset"]

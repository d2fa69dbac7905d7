"""Data sources. All yield dict batches {"image", "labels" (B, T), "label_mask" (B, T)}."""
from tr_jax.data.base import ArrayDataset, task_subset
from tr_jax.data.digits import load_digits

__all__ = ["ArrayDataset", "load_digits", "task_subset"]

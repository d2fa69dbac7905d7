"""Offline default: scikit-learn's bundled 8x8 handwritten digits as binary attribute tasks.

1797 real images (no download). Tasks are attributes derived from the digit label: ten
one-vs-rest tasks plus eight properties of the digit, 18 tasks in all. The train/test split is
deterministic (stratified by digit, ``random_state=0``; 75/25 by default).
"""
from __future__ import annotations

import numpy as np

from tr_jax.data.base import ArrayDataset

# attribute name -> the digits that have it
ATTRIBUTES: dict[str, tuple[int, ...]] = {
    **{f"is_{d}": (d,) for d in range(10)},
    "even": (0, 2, 4, 6, 8),
    "ge_5": (5, 6, 7, 8, 9),
    "prime": (2, 3, 5, 7),
    "closed_loop": (0, 4, 6, 8, 9),
    "multiple_of_3": (0, 3, 6, 9),
    "straight_strokes": (1, 4, 7),
    "square": (0, 1, 4, 9),
    "fibonacci": (0, 1, 2, 3, 5, 8),
}


def load_digits(test_fraction: float = 0.25) -> ArrayDataset:
    """The digits attribute tasks.

    Args:
      test_fraction: fraction of the 1797 images in the "test" split, in (0, 1).

    Returns:
      ArrayDataset with splits "train" and "test" (1347 and 450 images at the default 0.25):
      "image" float32 (N, 8, 8, 1) in [0, 1], "labels" int32 (N, 18), "label_mask" all True,
      and "digit" int32 (N,).
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    digit = data.target.astype(np.int32)
    members = np.array([[d in ds for ds in ATTRIBUTES.values()] for d in range(10)])
    labels = members[digit].astype(np.int32)
    train, test = train_test_split(np.arange(len(digit)), test_size=test_fraction,
                                   stratify=digit, random_state=0)
    splits = {name: {"image": images[idx], "labels": labels[idx],
                     "label_mask": np.ones_like(labels[idx], bool), "digit": digit[idx]}
              for name, idx in (("train", train), ("test", test))}
    return ArrayDataset("digits", tuple(ATTRIBUTES), splits)

"""Interleaved timing rounds shared by the CPU benchmarks.

On a shared machine the load drifts within a round too, and the case timed first in a round
also meets whatever the previous round's last case left in the caches. Rotating the order
from round to round spreads both over every case instead of charging them to one.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` in the order for round ``round_index``: rotated left by that many places
    (modulo ``len(items)``), so that over ``len(items)`` rounds each item runs once in each
    position."""
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]

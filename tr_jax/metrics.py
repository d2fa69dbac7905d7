"""Metric writers: JSON lines (always) and TensorBoard event files, by process 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def _jsonable(value: Any) -> Any:
    value = np.asarray(jax.device_get(value))
    return value.item() if value.ndim == 0 else value.tolist()


def _step_of(line: str) -> float:
    """The step of one ``metrics.jsonl`` line; +inf (dropped on resume) for a blank line or
    one cut off by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricWriter:
    """Writes ``{"step": s, **scalars}`` lines to ``workdir/metrics.jsonl`` and the scalars to
    TensorBoard (``workdir/tensorboard``). Only process 0 writes; others are no-ops.

    Args:
      workdir: run directory.
      tensorboard: also write TensorBoard event files (tensorboardX).
      resume_step: the step a resumed run restarts from: records of later steps (logged
        after the checkpoint by the stopped run, and about to be logged again) are dropped
        from ``metrics.jsonl`` and purged from TensorBoard, so every step appears once.
        None: append.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _step_of(line) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self._file = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record; array-valued metrics go to JSON only."""
        if not self.active:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()

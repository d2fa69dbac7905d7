"""Orbax checkpointing of a training run (every Orbax call of tr_jax lives in this module).

A checkpoint step holds two items:

* ``state`` -- the whole :class:`~tr_jax.train.TrainState` (step, params, batch_stats, routing
  masks, optimizer state, RNG, affinity running sum and count). PRNG key arrays are stored as
  their raw ``uint32`` key data and re-wrapped on restore.
* ``meta`` (JSON) -- the data-iterator :class:`Position` (epoch, next batch), the loop's own
  state (e.g. early stopping), a **fingerprint** of the model (class, constructor fields such as
  ``num_tasks``, ``sharing``, ``scheme``; task names; shape and dtype of every state leaf) and a
  **checksum** of every state leaf.

Restoring into a model whose fingerprint differs raises :class:`CheckpointMismatchError`
naming the differing fields; nothing is loaded. A step that cannot be read, or whose restored
arrays do not match their checksums, is reported with a warning, moved aside to
``<step>.corrupt`` and the next older step is tried. Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save is never listed as a step.

:class:`Checkpointer` also serves the training loop: ``every_steps`` cadence, the newest
``keep`` steps kept, SIGTERM turned into a flag while it is open (``with``), upon which
:meth:`Checkpointer.step_end` saves and raises :class:`Preempted` at the next step boundary.
Multi-process runs: every process must call ``save``/``restore``; the SIGTERM flag is local
to the process that received the signal (schedulers signal every process).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import warnings
from typing import Any, Mapping, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CORRUPT_SUFFIX = ".corrupt"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model, task set or data setup."""


class CheckpointCorruptedError(RuntimeError):
    """No step of a checkpoint directory could be restored intact."""


class Preempted(Exception):
    """Raised by :meth:`Checkpointer.step_end` after saving, once SIGTERM was received.

    Attributes:
      step: the step that was saved.
      directory: the checkpoint directory.
    """

    def __init__(self, step: int, directory: str):
        super().__init__(f"stopped by SIGTERM after step {step}; the checkpoint is in "
                         f"{directory}. Run again with --resume (resume=True) to continue.")
        self.step = step
        self.directory = directory


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the data iterator stands: the next batch to train on is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0

    @classmethod
    def after(cls, epoch: int, batch: int, steps_per_epoch: int) -> Position:
        """The position once batch ``batch`` of ``epoch`` has been trained on."""
        if batch + 1 >= steps_per_epoch:
            return cls(epoch + 1, 0)
        return cls(epoch, batch + 1)


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns."""

    state: Any
    position: Position
    loop: dict
    step: int


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state: Any) -> dict:
    """The state as a nested dict of plain arrays (PRNG keys as their uint32 key data)."""
    tree = flax.serialization.to_state_dict(state)
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_saveable(target: Any, tree: dict) -> Any:
    """Inverse of :func:`_to_saveable`, with ``target``'s structure and key implementations."""
    target_tree = flax.serialization.to_state_dict(target)
    tree = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        target_tree, tree)
    return flax.serialization.from_state_dict(target, tree)


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def fingerprint(model: Any, state: Any, task_names: tuple[str, ...] = (), **run: Any) -> dict:
    """What a checkpoint must match to be restored into ``model``/``state``.

    Args:
      model: the flax module (a :class:`~tr_jax.models.MultiTaskModel`); its class name and
        constructor fields (``num_tasks``, ``sharing``, ``scheme``, widths, ...) are recorded.
      state: the train state; the shape and dtype of every leaf are recorded (this covers the
        routing mask shapes (T, C), the head, the optimizer state and the affinity sum).
      task_names: the dataset's task names, in label-column order.
      **run: other settings a resumed run must share, e.g. ``batch_size``, ``seed`` and
        ``steps_per_epoch`` (they give the saved data position its meaning).

    Returns:
      A JSON-ready dict.
    """
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    leaves = jax.tree_util.tree_flatten_with_path(flax.serialization.to_state_dict(state))[0]
    shapes = {jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)}" for path, x in leaves}
    return _json_value({"model": type(model).__name__, "model_fields": fields,
                        "task_names": list(task_names), "run": run, "state": shapes})


def _differences(saved: Mapping, current: Mapping, limit: int = 6) -> list[str]:
    out = []
    for group in ("model", "model_fields", "task_names", "run", "state"):
        a, b = saved.get(group), current.get(group)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{group}.{key}: checkpoint {a.get(key, '(absent)')} vs this "
                               f"run {b.get(key, '(absent)')}")
        else:
            out.append(f"{group}: checkpoint {a} vs this run {b}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 (2,): sum and position-weighted sum of the leaf's bits, modulo 2**32.

    Integer sums do not depend on the reduction order, so the value is the same on any device
    count or sharding; any single changed word changes both.
    """
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = x.dtype.itemsize * 8
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{min(bits, 32)}"))
    words = words.astype(jnp.uint32).reshape(-1)
    weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.stack([words.sum(dtype=jnp.uint32), (words * weights).sum(dtype=jnp.uint32)])


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict[str, list[int]]:
    """Checksums of every leaf of ``state`` (see :func:`_leaf_checksum`), keyed by path."""
    tree = _to_saveable(state)
    sums = jax.device_get(_checksums(tree))
    return dict(zip(_paths(tree), ([int(v) for v in s] for s in jax.tree.leaves(sums))))


class StopSignal:
    """While entered, SIGTERM sets :attr:`requested` instead of ending the process.

    Only the main thread can install signal handlers; elsewhere this is a no-op that warns.
    The previous handler is put back on exit.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        del frame
        log.warning("received signal %d: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
        else:
            warnings.warn("StopSignal entered outside the main thread: SIGTERM is not caught.")
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


class Checkpointer:
    """Saves and restores a run's train state, data position and loop state with Orbax.

    Args:
      directory: checkpoint directory (created on first save).
      fingerprint: :func:`fingerprint` of this run's model and state.
      every_steps: save every this many steps from :meth:`step_end`; 0 turns checkpointing off
        (no saves, no SIGTERM handling, nothing to restore).
      keep: number of newest steps kept.
      config: the run's config, stored (as JSON) with each step for reference only.
      async_save: write in a background thread (the call returns once arrays are copied).

    Use as a context manager: SIGTERM handling is on while inside, and exiting waits for
    pending saves.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, *, every_steps: int = 0,
                 keep: int = 3, config: Any = None, async_save: bool = True):
        if every_steps < 0 or keep < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 0 (0: off) and keep={keep} "
                             ">= 1.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = fingerprint
        self.every_steps = every_steps
        self.enabled = every_steps > 0
        self._config = None if config is None else _json_value(
            config.to_dict() if hasattr(config, "to_dict") else config)
        self._stop = StopSignal()
        self._manager = None
        if self.enabled:
            # The cadence is decided here (``save``), deterministically: Orbax's own
            # interval check also skips a step while an earlier save is still in progress.
            options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                   enable_async_checkpointing=async_save)
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        if self.enabled:
            self._stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.__exit__(*exc)
        self.close()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def wait(self) -> None:
        """Blocks until pending (asynchronous) saves are on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM was received while this checkpointer was entered."""
        return self._stop.requested

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first ([] when checkpointing is off)."""
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    # -- saving --------------------------------------------------------------------------
    def save(self, state: Any, position: Position, loop: Mapping | None = None, *,
             force: bool = False) -> bool:
        """Saves ``state`` at step ``int(state.step)`` if due (every ``every_steps``) or forced.

        Args:
          state: the train state (not modified; safe to donate afterwards).
          position: data position after this step.
          loop: JSON-able loop state (e.g. early stopping), returned by :meth:`restore`.
          force: save even when the step is not a multiple of ``every_steps``.

        Returns:
          Whether a save was started (False when off, not due, or the step is already saved).
        """
        if self._manager is None:
            return False
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        if not (force or step % self.every_steps == 0):
            return False
        meta = {"version": FORMAT_VERSION, "step": step, "position": dataclasses.asdict(position),
                "loop": _json_value(dict(loop or {})), "fingerprint": self.fingerprint,
                "checksums": state_checksums(state), "config": self._config}
        return self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)))

    def step_end(self, state: Any, position: Position, loop: Mapping | None = None) -> None:
        """Call after every train step: saves when due; on SIGTERM saves and raises.

        Raises:
          Preempted: after saving, when SIGTERM was received (the run should exit cleanly).
        """
        if not self.enabled:
            return
        self.save(state, position, loop, force=self.stop_requested)
        if self.stop_requested:
            self.wait()
            raise Preempted(int(state.step), self.directory)

    # -- restoring -----------------------------------------------------------------------
    def start(self, state: Any, resume: bool) -> Restored:
        """Where a run begins: the newest intact checkpoint when resuming, else ``state``.

        Args:
          state: the freshly initialised train state.
          resume: continue from the checkpoints in the directory (a fresh start, logged, when
            there are none).

        Returns:
          :class:`Restored` (``Position()`` and an empty loop state for a fresh start).

        Raises:
          FileExistsError: not resuming, but the directory already holds steps.
          ValueError: resuming with checkpointing off.
        """
        fresh = Restored(state, Position(), {}, int(state.step))
        if resume:
            restored = self.restore(state)
            if restored is None:
                log.info("no checkpoint in %s: starting afresh", self.directory)
            return restored or fresh
        steps = self.all_steps()
        if steps:
            raise FileExistsError(
                f"{self.directory} already holds checkpoints (steps {steps}). Pass --resume "
                "(resume=True) to continue that run, or use a fresh workdir.")
        return fresh

    def restore(self, target: Any, step: int | None = None) -> Restored | None:
        """Restores the newest intact step (or ``step``) into ``target``'s structure.

        Args:
          target: a train state of this run (e.g. freshly initialised); gives the structure,
            shapes, dtypes and shardings the arrays are restored to.
          step: a specific step; None tries the newest first, then older ones.

        Returns:
          :class:`Restored`, or None when there is no checkpoint.

        Raises:
          CheckpointMismatchError: the checkpoint belongs to a different model or task set.
          CheckpointCorruptedError: no candidate step could be restored intact.
        """
        if self._manager is None:
            raise ValueError("checkpointing is off (every_steps=0): set "
                             "config.checkpoint_every_steps > 0 to save and resume runs.")
        steps = [step] if step is not None else self.all_steps()[::-1]
        failures = []
        for s in steps:
            try:
                meta = self._manager.restore(s, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # noqa: BLE001 -- any unreadable step is skipped
                failures.append((s, f"metadata unreadable: {err!r}"))
                continue
            self._check_fingerprint(meta.get("fingerprint", {}), s)
            try:
                state = self._restore_state(s, target, meta)
            except Exception as err:  # noqa: BLE001 -- damaged arrays: try the older step
                failures.append((s, repr(err)))
                continue
            self._quarantine(failures)
            return Restored(state, Position(**meta["position"]), meta.get("loop") or {}, s)
        if failures:
            detail = "; ".join(f"step {s}: {why}" for s, why in failures)
            raise CheckpointCorruptedError(
                f"no intact checkpoint in {self.directory} ({detail}). Delete the directory "
                "to start afresh.")
        return None

    def _check_fingerprint(self, saved: Mapping, step: int) -> None:
        differences = _differences(saved, self.fingerprint)
        if differences:
            raise CheckpointMismatchError(
                f"the checkpoint {self.directory} (step {step}) was written by a different "
                "model, task set or data setup, so it is not loaded:\n  " + "\n  ".join(differences)
                + "\nRun with the checkpoint's config, or use a fresh workdir.")

    def _restore_state(self, step: int, target: Any, meta: Mapping) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(target))
        tree = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        state = _from_saveable(target, tree)
        sums = state_checksums(state)
        bad = [path for path, value in meta["checksums"].items() if sums.get(path) != value]
        if bad:
            raise ValueError(f"checksum mismatch in {len(bad)} arrays (e.g. {bad[0]})")
        return state

    def _quarantine(self, failures: list[tuple[int, str]]) -> None:
        """Warns about the damaged steps and moves them aside (process 0) as ``<step>.corrupt``."""
        for step, why in failures:
            warnings.warn(f"checkpoint step {step} in {self.directory} is damaged ({why}); "
                          f"moved it to {step}{CORRUPT_SUFFIX} and used an older step.")
            if jax.process_index() == 0:
                src = os.path.join(self.directory, str(step))
                dst, n = src + CORRUPT_SUFFIX, 1
                while os.path.exists(dst):
                    dst, n = f"{src}{CORRUPT_SUFFIX}{n}", n + 1
                os.replace(src, dst)
        if failures:
            self._manager.reload()

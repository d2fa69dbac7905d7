"""Scale-out: a ("data", "task") device mesh, shardings, sharded steps, multi-host setup.

One mesh serves every kind of parallelism tr_jax uses:

* ``"data"`` splits the batch (data parallelism; GSPMD inserts the gradient all-reduce);
* ``"task"`` splits whatever has a task axis: the batched heads (kernel (D, T, K), bias
  (T, K)), the routing masks (T, C) and the rows of the TAG affinity matrix (each device
  computes the per-task gradients and lookahead forwards of its block of source tasks,
  :mod:`tr_jax.affinity.sharded`).

Which leaf is split how is decided in one place, :data:`PARAM_RULES` (regex on the leaf's
"/"-joined path in the train state -> :class:`jax.P`; first match wins; unmatched leaves are
replicated). Optimizer states mirror the parameter tree, so the same rule splits a head's
Adam moments like the head.

Multi-host: call :func:`initialize_distributed` first thing (it reads ``JAX_COORDINATOR_ADDRESS``
/ ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), have every process iterate the same global
batches and keep its own rows (:func:`host_local_batch`), and build global arrays from them
(:func:`shard_batch`). Metrics and checkpoints are written by process 0 only.

The mesh axes are ``AxisType.Auto``: the models are written without sharding annotations and
GSPMD propagates the input shardings through them.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import chex
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding

from tr_jax import train
from tr_jax.affinity import sharded as sharded_affinity
from tr_jax.models import MultiTaskModel

P = jax.P
DATA = "data"
TASK = "task"
AXES = (DATA, TASK)

Rules = Sequence[tuple[str, jax.P]]

#: How train-state leaves are split: (regex searched in the leaf's "/"-joined path, spec).
#: First match wins; leaves that match nothing are replicated. The paths look like
#: ``params/head/kernel``, ``opt_state/0/mu/head/kernel``,
#: ``routing/encoder/ConvNormRoute_0/TaskRouting_0/masks``.
PARAM_RULES: Rules = (
    (r"(^|/)head/kernel$", P(None, TASK, None)),  # batched heads (D, T, K)
    (r"(^|/)head/bias$", P(TASK, None)),          # (T, K)
    (r"(^|/)masks$", P(TASK, None)),              # routing masks (T, C)
)
#: Replicate everything (e.g. when T is not divisible by the task axis).
REPLICATED: Rules = ()

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# --------------------------------------------------------------------------------- multi-host

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, auto_detect: bool = False,
                           cpu_collectives: str | None = "gloo") -> bool:
    """Starts multi-host JAX (``jax.distributed.initialize``) from arguments or environment.

    Call it before anything else touches JAX. Missing arguments are read from
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of the three set anywhere this is a single-process run and
    nothing happens, unless ``auto_detect``: then JAX's own cluster detection runs (TPU pods,
    SLURM, Open MPI, ...).

    Args:
      coordinator_address: ``"host:port"`` of the coordinator (process 0).
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      auto_detect: with nothing configured, let ``jax.distributed.initialize()`` detect the
        cluster instead of running single-process.
      cpu_collectives: CPU cross-process collectives (``"gloo"`` or ``"mpi"``); None leaves
        JAX's setting alone. Only the CPU backend uses it.

    Returns:
      True if JAX runs distributed (now or already), False for a single-process run.

    Raises:
      ValueError: some but not all of the three settings are given, or they are malformed.
    """
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": address, "num_processes": num, "process_id": pid}
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if all(v is None for v in given.values()):
        if auto_detect:
            jax.distributed.initialize()
            return True
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"initialize_distributed got {', '.join(f'{k}={v!r}' for k, v in given.items())}: "
            f"{missing} missing. Give all three (or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
            f"{ENV_PROCESS_ID}), or none for a single-process run.")
    if not 0 <= pid < num:
        raise ValueError(f"process_id={pid} must lie in [0, num_processes={num}).")
    jax.distributed.initialize(address, num, pid)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


# ----------------------------------------------------------------------------------- the mesh

def make_mesh(data: int | None = None, task: int | None = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "task")`` mesh over all devices (or ``devices``), of every process.

    Args:
      data: size of the data axis; None or 0: the devices the task axis leaves.
      task: size of the task axis; None or 0: the devices the data axis leaves.
      devices: the devices to use (default ``jax.devices()``, all processes).

    Returns:
      A :class:`jax.sharding.Mesh` with axes ``("data", "task")`` of type ``Auto``.

    Raises:
      ValueError: negative sizes, both sizes left open, a given size that does not divide
        the device count, or ``data * task`` different from the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {DATA: data or 0, TASK: task or 0}
    if min(sizes.values()) < 0 or not any(sizes.values()):
        raise ValueError(f"mesh sizes must be positive with at most one left open (0/None), "
                         f"got data={data}, task={task}.")
    for axis, size in sizes.items():
        if size and n % size:
            raise ValueError(f"the {axis} axis size {size} does not divide the {n} devices; "
                             f"use a size in {_divisors(n)}.")
    data, task = (sizes[DATA] or n // sizes[TASK]), (sizes[TASK] or n // sizes[DATA])
    if data * task != n:
        raise ValueError(f"mesh (data={data}, task={task}) needs {data * task} devices, but "
                         f"there are {n}; data * task must equal the device count (pass "
                         f"devices=... to use a subset).")
    return jax.make_mesh((data, task), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(config: Mapping[str, Any], field: str = "mesh") -> Mesh:
    """The mesh of ``config[field] = {"data": int, "task": int}`` (0: the remaining devices).

    A missing field gives the all-data mesh.
    """
    spec = dict(config.get(field, None) or {})
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ValueError(f"config.{field} has unknown axes {sorted(unknown)}; use {AXES}.")
    return make_mesh(spec.get(DATA, 0), spec.get(TASK, 1))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- state shardings

def leaf_path(path: tuple) -> str:
    """The "/"-joined key path of a leaf, as :data:`PARAM_RULES` matches it."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = PARAM_RULES
             ) -> jax.P:
    """The PartitionSpec of one leaf: the first rule whose regex matches ``path``.

    Raises:
      ValueError: the matched spec does not fit the leaf's rank, or a split dimension is not
        divisible by its mesh axis size.
    """
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} -> {spec} is for rank {len(spec)}, but "
                         f"{path} has shape {shape}.")
    for dim, axis in zip(shape, spec):
        size = _axis_size(mesh, axis)
        if dim % size:
            raise ValueError(
                f"{path} has shape {shape}: its size {dim} is not divisible by the mesh "
                f"{axis!r} axis size {size} (rule {pattern!r} -> {spec}). Use a {axis} axis "
                f"size in {_divisors(dim)}, or rules=tr_jax.sharding.REPLICATED.")
    return spec


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = PARAM_RULES) -> Any:
    """A tree of :class:`jax.NamedSharding` for ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(leaf_path(path), np.shape(leaf), mesh,
                                                        rules)), tree)


def shard_state(state: train.TrainState, mesh: Mesh, rules: Rules = PARAM_RULES
                ) -> train.TrainState:
    """Places a train state (e.g. a restored one) on the mesh by ``rules``.

    The result may share buffers with ``state`` (``jax.device_put``); the sharded train step
    donates its state, so do not use ``state`` after stepping the result.
    """
    return jax.device_put(state, tree_shardings(state, mesh, rules))


def create_sharded_train_state(model: MultiTaskModel, optimizer: optax.GradientTransformation,
                               key: chex.PRNGKey, sample_batch: dict, mesh: Mesh,
                               rules: Rules = PARAM_RULES) -> train.TrainState:
    """:func:`tr_jax.train.create_train_state`, initialised directly into its shardings.

    Every process builds the same state (same ``key``) without a host copy of the whole state.
    """
    sample = {"image": np.asarray(sample_batch["image"][:1])}
    create = lambda k: train.create_train_state(model, optimizer, k, sample)  # noqa: E731
    shardings = tree_shardings(jax.eval_shape(create, key), mesh, rules)
    return jax.jit(create, out_shardings=shardings)(key)


# ------------------------------------------------------------------------------------ batches

def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``"data"``; scalars (a task id) replicated."""
    return NamedSharding(mesh, P(DATA) if ndim else P())


def local_data_blocks(mesh: Mesh) -> list[int]:
    """Indices along ``"data"`` of the batch blocks this process's devices hold, sorted."""
    data_index = {d: i for i, row in enumerate(mesh.devices) for d in row}
    return sorted({data_index[d] for d in mesh.local_devices})


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds (its devices' ``"data"`` blocks).

    Raises:
      ValueError: ``global_batch_size`` is not divisible by the data axis size, or the
        process's blocks are not adjacent on the mesh.
    """
    data = mesh.shape[DATA]
    if global_batch_size % data:
        raise ValueError(f"the global batch size {global_batch_size} is not divisible by the "
                         f"mesh data axis size {data}; use a multiple of {data}.")
    blocks = local_data_blocks(mesh)
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise ValueError(f"process {jax.process_index()} holds non-adjacent data blocks "
                         f"{blocks}; build the mesh with each process's devices adjacent.")
    block = global_batch_size // data
    return slice(blocks[0] * block, (blocks[-1] + 1) * block)


def host_local_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's rows of a global batch (every process iterates the same batches).

    Args:
      batch: the global batch, leaves (B, ...) or scalars (kept whole).
      mesh: the mesh.

    Returns:
      The local batch, leaves (B / num_data_processes, ...), to give :func:`shard_batch`.
    """
    b = _batch_size(batch)
    rows = process_rows(mesh, b)
    return {k: (np.asarray(v)[rows] if np.ndim(v) else v) for k, v in batch.items()}


def pad_batch(batch: Mapping[str, Any], multiple: int) -> dict[str, np.ndarray]:
    """The batch padded to a multiple of ``multiple`` rows that count in no metric.

    Args:
      batch: leaves (B, ...) with ``"labels"`` (B, T) and optionally ``"label_mask"`` (B, T).
      multiple: e.g. the mesh's data axis size.

    Returns:
      leaves (B + p, ...), p = -B mod ``multiple``, the added rows copies of row 0; a
      ``"label_mask"`` (B + p, T) that is 0 on the added rows (1 where the batch had none).
    """
    b = _batch_size(batch)
    labels = np.asarray(batch["labels"])
    out = dict(batch)
    out["label_mask"] = np.asarray(batch.get("label_mask", np.ones(labels.shape, bool)))
    pad = -b % multiple
    if not pad:
        return out
    padded = {k: (np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], pad, 0)])
                  if np.ndim(v) else v) for k, v in out.items()}
    padded["label_mask"][b:] = False
    return padded


def _batch_size(batch: Mapping[str, Any]) -> int:
    sizes = {np.shape(v)[0] for v in batch.values() if np.ndim(v)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the batch size: "
                         f"{ {k: np.shape(v) for k, v in batch.items()} }.")
    return sizes.pop()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, batch axis split over ``"data"``, from this process's rows.

    Single process: the local batch is the global batch. Arrays already placed with the right
    sharding pass through untouched (no transfer).

    Args:
      batch: this process's rows (:func:`host_local_batch`): leaves (B_local, ...) or scalars
        (the same on every process).
      mesh: the mesh.

    Returns:
      dict of global :class:`jax.Array`, leaves (B, ...) sharded ``P("data")``.

    Raises:
      ValueError: the (global) batch size is not divisible by the data axis size.
    """
    out = {}
    for key, value in batch.items():
        sharding = batch_sharding(mesh, np.ndim(value))
        if isinstance(value, jax.Array) and value.sharding == sharding:
            out[key] = value
            continue
        value = np.asarray(value)
        if value.ndim:
            local_blocks = len(local_data_blocks(mesh))
            if value.shape[0] % local_blocks:
                global_size = value.shape[0] * mesh.shape[DATA] // local_blocks
                raise ValueError(
                    f"batch[{key!r}] has {value.shape[0]} rows on this process (global batch "
                    f"{global_size}), not divisible by the {local_blocks} data shard(s) "
                    f"it feeds (mesh data axis size {mesh.shape[DATA]}); use a global batch "
                    f"size that is a multiple of {mesh.shape[DATA]}.")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# ------------------------------------------------------------------------------ sharded steps

class ShardedStep:
    """A step jitted with shardings; calling it places the batch (:func:`shard_batch`) first.

    Attributes:
      jitted: the ``jax.jit`` function ``(state, global batch) -> outputs`` (``.lower`` for
        memory analysis).
      mesh: the mesh.
      traces: how many times the step has been traced (1 after the first call; more means
        recompiles, e.g. a batch that changed shape, dtype or sharding).
      max_traces: if set, a further trace raises ``RuntimeError``.
    """

    def __init__(self, step: Callable, mesh: Mesh, state: train.TrainState, rules: Rules,
                 donate_state: bool, max_traces: int | None):
        self.mesh, self.max_traces, self.traces = mesh, max_traces, 0
        state_sh = tree_shardings(state, mesh, rules)
        replicated = NamedSharding(mesh, P())

        def counted(state, batch):
            self.traces += 1
            if self.max_traces is not None and self.traces > self.max_traces:
                raise RuntimeError(
                    f"the sharded step was traced {self.traces} times (max_traces="
                    f"{self.max_traces}): the batch changed shape, dtype or sharding; got "
                    f"{jax.tree.map(lambda a: (a.shape, a.dtype), batch)}.")
            return step(state, batch)

        # The batch's shardings are taken from the placed arrays (shard_batch): None = inferred.
        self.jitted = jax.jit(
            counted, in_shardings=(state_sh, None),
            out_shardings=(state_sh, replicated) if donate_state else replicated,
            donate_argnums=0 if donate_state else ())

    def __call__(self, state: train.TrainState, batch: Mapping[str, Any]):
        return self.jitted(state, shard_batch(batch, self.mesh))

    def lower(self, state: train.TrainState, batch: Mapping[str, Any]):
        return self.jitted.lower(state, shard_batch(batch, self.mesh))


def shard_train_step(model: MultiTaskModel, optimizer: optax.GradientTransformation,
                     mesh: Mesh, state: train.TrainState, *, rules: Rules = PARAM_RULES,
                     task_parallel: bool = True, max_traces: int | None = None,
                     **step_kwargs) -> ShardedStep | train.PeriodicStep:
    """:func:`tr_jax.train.make_train_step` jitted over the mesh, state donated.

    Args:
      model, optimizer: as for ``make_train_step``.
      mesh: a ``("data", "task")`` mesh (:func:`make_mesh`).
      state: the (sharded or abstract) train state; only its structure and shapes are used.
      rules: state sharding rules.
      task_parallel: with ``affinity="lookahead"``, split the affinity's source tasks over
        the mesh's ``"task"`` axis (:func:`tr_jax.affinity.sharded.task_parallel`).
      max_traces: if set, a retrace beyond this many raises (catches recompiles).
      **step_kwargs: passed to ``make_train_step`` (``mode``, ``chunk_size``, ``affinity``...).

    Returns:
      ``step(state, batch) -> (state, metrics)``; metrics replicated; the batch may be numpy
      (this process's rows) or already placed by :func:`shard_batch`. A
      :class:`~tr_jax.train.PeriodicStep` of two sharded steps when the affinity is measured
      every k > 1 steps with host dispatch.
    """
    if task_parallel and step_kwargs.get("affinity") == "lookahead":
        step_kwargs.setdefault("affinity_fn", sharded_affinity.task_parallel(mesh, TASK))
    step = train.make_train_step(model, optimizer, jit=False, **step_kwargs)

    def sharded(fn: Callable) -> ShardedStep:
        return ShardedStep(fn, mesh, state, rules, True, max_traces)

    if isinstance(step, train.PeriodicStep):
        return train.PeriodicStep(sharded(step.measure), sharded(step.skip), step.every)
    return sharded(step)


def shard_eval_step(model: MultiTaskModel, mesh: Mesh, state: train.TrainState, *,
                    rules: Rules = PARAM_RULES, max_traces: int | None = None,
                    **step_kwargs) -> ShardedStep:
    """:func:`tr_jax.train.make_eval_step` jitted over the mesh (counts replicated)."""
    step = train.make_eval_step(model, jit=False, **step_kwargs)
    return ShardedStep(step, mesh, state, rules, False, max_traces)

"""Train state, jitted train and eval steps for routed many-task models.

The train state is a plain pytree (:class:`TrainState`): parameters, BatchNorm statistics,
routing masks (outside the optimizer), optimizer state, step, RNG and the running TAG affinity
sum. The model and optimizer are not part of it; they are given to the step factories.

Training modes (DESIGN §2):

* ``"task_per_batch"`` -- the paper: the whole batch is routed through one task
  (``batch["task"]`` an int scalar), tasks visited in shuffled order by the loop.
* ``"per_example"`` -- each example carries its task id (``batch["task"]`` (B,)): one forward
  trains many tasks at the cost of one.
* ``"all_tasks"`` -- every example through every task (one trunk forward for unrouted models,
  one per task for routed ones); the loss is the sum of the per-task losses (TAG's objective).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Literal

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tr_jax import affinity as affinity_lib
from tr_jax import losses as losses_lib
from tr_jax import routing
from tr_jax.affinity import estimators
from tr_jax.models import MultiTaskModel, apply_all_tasks

Mode = Literal["task_per_batch", "per_example", "all_tasks"]
MODES = ("task_per_batch", "per_example", "all_tasks")
LOOKAHEADS = ("sgd", "optimizer")
SHARED = ("encoder",)  # the parameters TAG's lookahead moves: the shared trunk


def _lookahead(loss_fn, shared, rest, batch, *, lr, update_fn, key, strategy, chunk_size,
               losses_and_grads=None):
    del key
    return affinity_lib.lookahead_affinity(loss_fn, shared, rest, batch, lr=lr,
                                           update_fn=update_fn, strategy=strategy,
                                           chunk_size=chunk_size,
                                           losses_and_grads=losses_and_grads)


def _cosine(loss_fn, shared, rest, batch, *, lr, update_fn, key, strategy, chunk_size,
            losses_and_grads=None):
    del lr, update_fn, key
    return affinity_lib.gradient_cosine(loss_fn, shared, rest, batch, strategy=strategy,
                                        chunk_size=chunk_size, losses_and_grads=losses_and_grads)


def _taylor(loss_fn, shared, rest, batch, *, lr, update_fn, key, strategy, chunk_size,
            losses_and_grads=None):
    del key
    return estimators.taylor_affinity(loss_fn, shared, rest, batch, lr=lr, update_fn=update_fn,
                                      strategy=strategy, chunk_size=chunk_size,
                                      losses_and_grads=losses_and_grads)


def _sketch(loss_fn, shared, rest, batch, *, lr, update_fn, key, strategy, chunk_size):
    return estimators.sketched_affinity(loss_fn, shared, rest, batch, lr=lr, key=key,
                                        update_fn=update_fn, strategy=strategy,
                                        chunk_size=chunk_size)


# name -> fn(loss_fn, shared, rest, batch, *, lr, update_fn, key, strategy, chunk_size) -> (T, T)
AFFINITIES: dict[str, Callable[..., jax.Array]] = {
    "lookahead": _lookahead, "cosine": _cosine, "taylor": _taylor, "sketch": _sketch}
# Those that start from the per-task gradients (a ``losses_and_grads`` keyword): a step that
# measures one of them reuses those gradients for its update (their sum) instead of running a
# backward pass of its own.
FROM_TASK_GRADS = ("lookahead", "cosine", "taylor")
# Needs the model's structure (encoder output, heads) rather than a loss_fn: measured by
# estimators.model_representation_affinity on the step's variables; unrouted models only.
REPRESENTATION = "representation"
Metrics = dict[str, jax.Array]
Dispatch = Literal["auto", "host", "cond"]
DISPATCHES = ("auto", "host", "cond")


class TrainState(flax.struct.PyTreeNode):
    """Everything a run carries from step to step (a pytree; checkpointed as a whole).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: trained parameters ({"encoder": ..., "head": ...}).
      batch_stats: BatchNorm running statistics ({} when the model has none).
      routing: the fixed routing masks ({} for unrouted models); never seen by the optimizer.
      opt_state: optimizer state over ``params`` only.
      rng: PRNG key of the step's randomness (folded with ``step``; the sketched affinity's
        directions draw from it).
      affinity_sum: float32 (T, T), running sum of the measured affinity matrices.
      affinity_count: int32 (T, T), the number of measured steps added into each entry: an
        entry [i, j] counts the steps on which both tasks i and j had a labelled example and
        the measured value was finite.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    routing: Any
    opt_state: Any
    rng: jax.Array
    affinity_sum: jax.Array
    affinity_count: jax.Array

    @property
    def variables(self) -> dict:
        """The model's variables, as ``model.apply`` takes them."""
        out = {"params": self.params, "routing": self.routing}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def create_train_state(model: MultiTaskModel, optimizer: optax.GradientTransformation,
                       key: chex.PRNGKey, sample_batch: dict) -> TrainState:
    """Initialises a model and its optimizer.

    Parameters, routing masks and the step RNG come from independent streams split off
    ``key``, so the masks do not change when the parameter initialisation does.

    Args:
      model: a :class:`~tr_jax.models.MultiTaskModel`.
      optimizer: an optax transformation; it only ever sees ``params``.
      key: PRNG key.
      sample_batch: a batch (only ``sample_batch["image"]``'s shape and dtype are used).

    Returns:
      The initial :class:`TrainState`.
    """
    k_params, k_routing, k_rng = jax.random.split(key, 3)
    x = jnp.asarray(sample_batch["image"][:1])
    variables = model.init({"params": k_params, "routing": k_routing}, x, 0, train=False)
    params = variables["params"]
    t = model.num_tasks
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      routing=variables.get(routing.ROUTING, {}),
                      opt_state=optimizer.init(params), rng=k_rng,
                      affinity_sum=jnp.zeros((t, t), jnp.float32),
                      affinity_count=jnp.zeros((t, t), jnp.int32))


def check_batch(batch: dict, num_tasks: int, mode: Mode,
                affinity_mode: Mode | None = None) -> None:
    """Raises a clear error when a batch does not fit the model, the training mode and (when
    given) the mode of the affinity's losses."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}.")
    if affinity_mode == "per_example" and mode != "per_example":
        if "task" not in batch:
            raise KeyError("affinity_mode='per_example' needs batch['task'], the task of each "
                           "example (ints (B,)); use affinity_mode='all_tasks' otherwise.")
        check_batch(batch, num_tasks, "per_example")
    for key in ("image", "labels"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} entry; got keys {sorted(batch)}.")
    b = np.shape(batch["image"])[0]
    if np.shape(batch["labels"]) != (b, num_tasks):
        raise ValueError(f"batch['labels'] must have shape (B, T) = ({b}, {num_tasks}); got "
                         f"{np.shape(batch['labels'])}.")
    if "label_mask" in batch and np.shape(batch["label_mask"]) != (b, num_tasks):
        raise ValueError(f"batch['label_mask'] must have shape ({b}, {num_tasks}); got "
                         f"{np.shape(batch['label_mask'])}.")
    if mode != "all_tasks":
        if "task" not in batch:
            raise KeyError(f"mode={mode!r} needs batch['task'] "
                           f"({'an int scalar' if mode == 'task_per_batch' else 'ints (B,)'}).")
        want = () if mode == "task_per_batch" else (b,)
        if np.shape(batch["task"]) != want:
            raise ValueError(f"mode={mode!r} needs batch['task'] of shape {want}; got "
                             f"{np.shape(batch['task'])}.")
        routing.check_task_ids(batch["task"], num_tasks, b)


def model_losses(model: MultiTaskModel, variables: dict, batch: dict, mode: Mode, *,
                 train: bool, chunk_size: int | None = None
                 ) -> tuple[jax.Array, jax.Array, Any]:
    """Loss of one batch under a training mode.

    Args:
      model: the model.
      variables: its variables (params, routing, optional batch_stats).
      batch: {"image", "labels" (B, T), optional "label_mask" (B, T), "task" for routed modes}.
      mode: training mode.
      train: BatchNorm in training mode (batch statistics; updates returned).
      chunk_size: tasks per vmapped chunk for ``"all_tasks"`` on routed models.

    Returns:
      (total loss scalar, per-task losses (T,), new batch_stats or None).
    """
    x, labels, mask = batch["image"], batch["labels"], batch.get("label_mask")
    if mode == "all_tasks":
        logits, new_stats = apply_all_tasks(model, variables, x, train=train,
                                            chunk_size=chunk_size)
        per_task = losses_lib.per_task_losses(logits, labels, mask)
        return per_task.sum(), per_task, new_stats
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    out = model.apply(variables, x, batch["task"], train, mutable=mutable)
    logits, updates = out if mutable else (out, {})
    total, per_task = losses_lib.routed_losses(logits, labels, batch["task"], model.num_tasks,
                                               mask)
    return total, per_task, updates.get("batch_stats")


@dataclasses.dataclass(frozen=True)
class PeriodicStep:
    """A train step that measures the affinity every ``every``-th step, chosen on the host.

    Calling it reads ``state.step`` (a scalar transfer, which waits for the previous step) and
    runs ``measure`` when ``state.step % every == 0``, else ``skip``: both take and return the
    same pytrees, so they compile once each. ``lower`` / ``compile`` / ``memory_analysis``
    follow ``jax.stages`` on both steps (the analysis is the measuring step's, the larger).

    Attributes:
      measure: ``(state, batch) -> (state, metrics)`` that measures the affinity.
      skip: the same step without measuring (``metrics["affinity"]`` zeros).
      every: k.
    """

    measure: Any
    skip: Any
    every: int

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        if isinstance(state.step, jax.core.Tracer):
            raise TypeError("this train step picks its measuring steps on the host "
                            "(affinity_dispatch='host') and cannot be traced; build it with "
                            "affinity_dispatch='cond' to call it inside a jit.")
        due = int(state.step) % self.every == 0
        return (self.measure if due else self.skip)(state, batch)

    def lower(self, state: TrainState, batch: dict) -> PeriodicStep:
        return PeriodicStep(self.measure.lower(state, batch), self.skip.lower(state, batch),
                            self.every)

    def compile(self) -> PeriodicStep:
        return PeriodicStep(self.measure.compile(), self.skip.compile(), self.every)

    def memory_analysis(self) -> Any:
        return self.measure.memory_analysis()


def make_train_step(model: MultiTaskModel, optimizer: optax.GradientTransformation, *,
                    mode: Mode = "all_tasks", chunk_size: int | None = None,
                    affinity: str | None = None, affinity_every: int = 1,
                    lookahead: str = "sgd", lr: float | optax.Schedule | None = None,
                    strategy: str = "auto",
                    affinity_chunk_size: int | None = None, affinity_mode: Mode = "all_tasks",
                    affinity_fn: Callable[..., jax.Array] | None = None,
                    affinity_dispatch: Dispatch = "auto", jit: bool = True
                    ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """Builds the train step ``(state, batch) -> (state, metrics)``.

    With ``affinity`` set, every ``affinity_every``-th step (``state.step % k == 0``) also
    measures a (T, T) task-affinity matrix inside the same jitted step, on the same batch and
    before the update, and adds it to ``state.affinity_sum`` / ``affinity_count``. The update
    itself is the step's ``mode`` update either way. The affinity's losses (``affinity_mode``)
    use BatchNorm with the batch's statistics and no running-average update. Entries [i, j]
    where task i or j has no labelled example in the batch (its loss is 0) are not measured
    on that step: they are NaN in ``metrics["affinity"]`` and left out of the running sum and
    count, as are non-finite measured entries (e.g. Z normalized by a schedule's rate of 0);
    the measurement never changes the update.

    Args:
      model: the model.
      optimizer: the optax transformation used by :func:`create_train_state`.
      mode: ``"task_per_batch"``, ``"per_example"`` or ``"all_tasks"``.
      chunk_size: tasks per vmapped chunk in all-tasks forwards of routed models.
      affinity: None, or one of :data:`AFFINITIES`: ``"lookahead"`` (TAG), ``"cosine"``
        (gradient cosine similarity), ``"taylor"`` / ``"sketch"`` (first-order estimators),
        or ``"representation"`` (first-order at the encoder's output, unrouted models only;
        ``lookahead``, ``strategy`` and ``affinity_mode`` do not apply to it).
      affinity_every: measure every k-th step (official CelebA: 1; Taskonomy: 10); see
        ``affinity_dispatch`` for how k > 1 picks the steps.
      lookahead: ``"sgd"`` (Δ_i = lr g_i) or ``"optimizer"`` (the optimizer's own step from
        g_i alone at its current state, e.g. SGD momentum as in the official CelebA code).
      lr: learning rate that normalizes Z (and the ``"sgd"`` lookahead step); required with
        ``affinity``. A float or, when the optimizer follows a schedule, the same optax
        schedule: each measurement then uses its rate at ``state.step``, the rate of the
        optimizer's own step (with ``lookahead="optimizer"``, Δ_i is taken at that rate).
      strategy: how the T lookahead forwards run (see
        :func:`tr_jax.affinity.lookahead_affinity`).
      affinity_chunk_size: tasks per chunk inside the affinity computation.
      affinity_mode: the per-task losses the affinity compares: ``"all_tasks"`` (every task
        on every example; T routed forwards per loss) or ``"per_example"`` (each task on the
        examples routed to it, ``batch["task"]``: one forward per loss, for large T; every
        task must appear in the batch).
      affinity_fn: replaces ``AFFINITIES[affinity]`` (same signature), e.g.
        :func:`tr_jax.affinity.sharded.task_parallel` to split the tasks over devices.
      affinity_dispatch: with ``affinity_every`` > 1, how a step decides whether to measure:
        ``"cond"`` -- one step with the measurement in a ``jax.lax.cond`` on ``state.step``
        (traceable inside a larger jit); ``"host"`` -- a :class:`PeriodicStep` that reads
        ``state.step`` (one scalar transfer) and runs one of two compiled steps, the measuring
        one or the plain one; ``"auto"`` -- ``"host"`` on CPU, ``"cond"`` elsewhere. XLA:CPU
        runs gradient convolutions inside a conditional with slow generic kernels (a TAG
        CelebA step at T = 9 did not finish in 13 minutes instead of 4 s).
      jit: return a ``jax.jit``-compiled step (state donated).

    Returns:
      The step. ``metrics`` holds ``loss`` (scalar), ``task_losses`` (T,), ``grad_norm`` and
      ``finite``; with affinity also ``affinity`` (T, T; zeros on steps that do not measure,
      NaN where a task had no label) and ``affinity_measured`` (bool). A non-finite loss or
      gradient leaves the state unchanged (the affinity sum included) and sets ``finite``
      False, so the loop can stop and resume from the last checkpoint.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}.")
    if affinity is not None:
        if affinity not in AFFINITIES and affinity != REPRESENTATION:
            raise ValueError(f"affinity={affinity!r} is unknown; use None or one of "
                             f"{sorted([*AFFINITIES, REPRESENTATION])}.")
        if affinity == REPRESENTATION and affinity_fn is None:
            estimators.model_representation(model)   # raises for routed models
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"lookahead={lookahead!r} is unknown; use one of {LOOKAHEADS}.")
        if lr is None or not (callable(lr) or lr > 0):
            raise ValueError(f"affinity={affinity!r} needs the learning rate lr > 0 (or the "
                             f"optimizer's schedule) that normalizes Z; got lr={lr}.")
        if int(affinity_every) < 1:
            raise ValueError(f"affinity_every={affinity_every} must be >= 1.")
        if affinity_dispatch not in DISPATCHES:
            raise ValueError(f"affinity_dispatch={affinity_dispatch!r} is unknown; use one of "
                             f"{DISPATCHES}.")
        if affinity_mode not in ("all_tasks", "per_example"):
            raise ValueError(f"affinity_mode={affinity_mode!r} must be 'all_tasks' or "
                             "'per_example'.")
        if affinity_mode == "per_example" and mode == "task_per_batch":
            raise ValueError("affinity_mode='per_example' compares tasks on the examples "
                             "routed to each, but mode='task_per_batch' routes the whole batch "
                             "through one task; use affinity_mode='all_tasks'.")

    # With the affinity measured from the per-task gradients of the training loss itself, the
    # update's gradient is their sum: no backward pass of its own (see FROM_TASK_GRADS).
    reuse_grads = (affinity in FROM_TASK_GRADS and affinity_fn is None
                   and mode == affinity_mode == "all_tasks")

    def loss_fn(params, state, batch):
        variables = {**state.variables, "params": params}
        total, per_task, new_stats = model_losses(model, variables, batch, mode, train=True,
                                                  chunk_size=chunk_size)
        return total, (per_task, new_stats)

    def measure(state: TrainState, batch: dict, losses_and_grads=None) -> jax.Array:
        lr_now = lr(state.step) if callable(lr) else lr
        if affinity == REPRESENTATION and affinity_fn is None:
            return estimators.model_representation_affinity(
                model, state.variables, batch, lr=lr_now).astype(jnp.float32)
        shared, rest = affinity_lib.split_params(state.params, SHARED)
        others = {k: v for k, v in state.variables.items() if k != "params"}

        # The non-parameter variables travel in `rest` rather than in a closure: the
        # task-parallel affinity (tr_jax.affinity.sharded) cannot index closed-over arrays.
        def task_losses(shared, rest, batch):
            params_rest, others = rest
            variables = {**others, "params": affinity_lib.merge_params(shared, params_rest)}
            return model_losses(model, variables, batch, affinity_mode, train=True,
                                chunk_size=chunk_size)[1]

        update_fn = (affinity_lib.optax_lookahead(optimizer, state.opt_state, shared, rest)
                     if lookahead == "optimizer" else None)
        fn = affinity_fn or AFFINITIES[affinity]
        extra = {} if losses_and_grads is None else {"losses_and_grads": losses_and_grads}
        z = fn(task_losses, shared, (rest, others), batch, lr=lr_now, update_fn=update_fn,
               key=jax.random.fold_in(state.rng, state.step), strategy=strategy,
               chunk_size=affinity_chunk_size, **extra)
        return z.astype(jnp.float32)

    def measure_and_grads(state: TrainState, batch: dict):
        """The affinity, and the loss and gradients of the update from the same pullbacks."""
        shared, rest = affinity_lib.split_params(state.params, SHARED)

        def losses(shared, rest, batch):
            return loss_fn(affinity_lib.merge_params(shared, rest), state, batch)[1]

        per_task, task_grads, rest_grad, new_stats = affinity_lib.per_task_and_total_grads(
            losses, shared, rest, batch, has_aux=True, strategy=strategy,
            chunk_size=affinity_chunk_size)
        z = measure(state, batch, (per_task, task_grads))
        grads = affinity_lib.merge_params(jax.tree.map(lambda g: g.sum(0), task_grads),
                                          rest_grad)
        return z, ((per_task.sum(), (per_task, new_stats)), grads)

    def make_step(measuring: bool | None):
        """The step that always (True), never (False) or every k-th step (None) measures."""

        def step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
            metrics, out = {}, None
            old = state
            if affinity is not None:
                if measuring and reuse_grads:
                    measured = jnp.bool_(True)
                    z, out = measure_and_grads(state, batch)
                elif measuring is None:
                    measured = state.step % affinity_every == 0
                    z = jax.lax.cond(measured, measure,
                                     lambda *_: jnp.zeros_like(state.affinity_sum), state, batch)
                else:
                    measured = jnp.bool_(measuring)
                    z = measure(state, batch) if measuring else jnp.zeros_like(
                        state.affinity_sum)
                # A task with no labelled example has loss 0: Z's column j is 0 / 0 and its
                # row i a step of size 0. Those entries are left out of the run mean.
                present = losses_lib.labelled_tasks(
                    batch["labels"], batch.get("label_mask"),
                    batch["task"] if affinity_mode == "per_example" else None)
                counted = present[:, None] & present[None, :] & measured
                metrics.update(affinity=jnp.where(counted | ~measured, z, jnp.nan),
                               affinity_measured=measured)
                # Non-finite entries (e.g. a schedule's rate of 0 normalizing Z) are not added.
                counted &= jnp.isfinite(z)
                state = state.replace(
                    affinity_sum=state.affinity_sum + jnp.where(counted, z, 0.0),
                    affinity_count=state.affinity_count + counted)
            if out is None:
                out = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
            (total, (per_task, new_stats)), grads = out
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
            new = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state,
                                batch_stats=state.batch_stats if new_stats is None else new_stats)
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            metrics.update(loss=total, task_losses=per_task, grad_norm=grad_norm,
                           finite=finite)
            return new, metrics

        return jax.jit(step, donate_argnums=0) if jit else step

    if affinity is None or affinity_every == 1:
        return make_step(True)
    if affinity_dispatch == "auto":
        affinity_dispatch = "host" if jax.default_backend() == "cpu" else "cond"
    if affinity_dispatch == "cond":
        return make_step(None)
    return PeriodicStep(make_step(True), make_step(False), affinity_every)


def make_eval_step(model: MultiTaskModel, *, chunk_size: int | None = None,
                   jit: bool = True) -> Callable[[TrainState, dict], Metrics]:
    """Builds ``(state, batch) -> counts``: per-task confusion counts over all tasks.

    Every example is evaluated on every task (``"all_tasks"``), BatchNorm in inference mode.
    The returned dict holds (T,) float arrays ``tp``, ``tn``, ``fp``, ``fn`` (binary tasks;
    class 1 = positive) and ``correct``, ``count`` (any K), summed over the batch's labelled
    examples; add them over batches and call :func:`summarize_counts`.
    """

    def step(state: TrainState, batch: dict) -> Metrics:
        logits, _ = apply_all_tasks(model, state.variables, batch["image"], train=False,
                                    chunk_size=chunk_size)
        labels = batch["labels"]
        mask = batch.get("label_mask")
        mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        pred = logits.argmax(-1)
        pos, hit = (labels == 1), (pred == labels)
        return {"correct": (hit * mask).sum(0), "count": mask.sum(0),
                "tp": ((hit & pos) * mask).sum(0),
                "tn": ((hit & ~pos) * mask).sum(0), "fp": ((~hit & ~pos) * mask).sum(0),
                "fn": ((~hit & pos) * mask).sum(0)}

    return jax.jit(step) if jit else step


def summarize_counts(counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-task accuracy and balanced accuracy, and their means over tasks.

    Args:
      counts: summed outputs of an eval step, (T,) arrays.

    Returns:
      {"accuracy": (T,), "balanced_accuracy": (T,), "mean_accuracy": float,
      "mean_balanced_accuracy": float}. Balanced accuracy is the mean of the true-positive and
      true-negative rates over the classes present. A task with no labelled example has NaN
      accuracies and is left out of the means.
    """
    c = {k: np.asarray(v, np.float64) for k, v in counts.items()}
    acc = np.where(c["count"] > 0, c["correct"] / np.maximum(c["count"], 1), np.nan)
    tpr = np.where(c["tp"] + c["fn"] > 0, c["tp"] / np.maximum(c["tp"] + c["fn"], 1), np.nan)
    tnr = np.where(c["tn"] + c["fp"] > 0, c["tn"] / np.maximum(c["tn"] + c["fp"], 1), np.nan)
    bal = np.nanmean(np.stack([tpr, tnr]), axis=0)
    return {"accuracy": acc, "balanced_accuracy": bal, "mean_accuracy": float(np.nanmean(acc)),
            "mean_balanced_accuracy": float(np.nanmean(bal))}


def evaluate(eval_step: Callable[[TrainState, dict], Metrics], state: TrainState,
             batches: Iterable[dict]) -> dict[str, Any]:
    """Runs ``eval_step`` over ``batches`` and summarizes (see :func:`summarize_counts`)."""
    total = None
    for batch in batches:
        out = jax.device_get(eval_step(state, {k: v for k, v in batch.items()
                                               if k in ("image", "labels", "label_mask")}))
        total = out if total is None else jax.tree.map(np.add, total, out)
    if total is None:
        raise ValueError("evaluate() got no batches.")
    return summarize_counts(total)


def mean_affinity(state: TrainState) -> jax.Array:
    """The run-averaged affinity matrix (T, T): each entry's running sum over the steps that
    measured it / their count (NaN for a pair never measured: one of its tasks never had a
    labelled example in a measuring batch, or its values were never finite).

    ``Z[i, j]`` is the effect of a step on source task i onto target task j.
    """
    count = np.asarray(state.affinity_count)
    if not count.any():
        raise ValueError("no affinity has been measured yet: train with affinity=... and at "
                         "least affinity_every steps.")
    return jnp.where(count > 0, state.affinity_sum / np.maximum(count, 1), jnp.nan)

"""Runs an experiment from a config: builds data, model and optimizer, trains, evaluates.

``train_and_evaluate(config, workdir)`` is what ``tr-jax train`` and the study scripts call
(the Flax-examples convention). Configs are ``ml_collections.ConfigDict`` files in
``experiments/configs/``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from tr_jax import checkpoint, models, plots, sharding, train
from tr_jax.data import ArrayDataset, load_digits, task_subset
from tr_jax.metrics import MetricWriter

MODELS = {"RoutedVGG": models.RoutedVGG, "RoutedResNet": models.RoutedResNet,
          "RoutedResNet18": models.RoutedResNet18, "SmallCNN": models.SmallCNN,
          "MLP": models.MLP}


def config_variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
    """The comma-separated variants a config file's ``get_config(arg)`` got (from
    ``--config CONFIG.py:a,b``), each checked against the file's ``known`` ones."""
    variants = set(filter(None, (arg or "").split(",")))
    if variants - set(known):
        raise ValueError(f"unknown config variants {sorted(variants - set(known))}; use one "
                         f"of {known}.")
    return variants


def build_dataset(config: ml_collections.ConfigDict) -> ArrayDataset:
    """The dataset named by ``config.dataset``, restricted to ``config.tasks`` if given.

    ``"celeb_a"`` and ``"cub"`` stream from prepared TFDS data in ``config.data_dir`` (loader
    options in ``config.dataset_kwargs``); their tasks are ``config.tasks`` (names/indices) or,
    when empty, the first ``config.num_tasks``.
    """
    name = config.dataset
    kwargs = config.get("dataset_kwargs", ml_collections.ConfigDict()).to_dict()
    if name in ("celeb_a", "cub"):
        from tr_jax.data.celeba import load_celeba
        from tr_jax.data.cub import load_cub
        loader = load_celeba if name == "celeb_a" else load_cub
        return loader(config.get("data_dir"), tasks=config.get("tasks") or config.get("num_tasks"),
                      **kwargs)
    if name == "digits":
        dataset = load_digits()
    elif name == "synthetic":
        from tr_jax.data.synthetic import load_synthetic
        dataset = load_synthetic(**kwargs)
    else:
        raise ValueError(f"config.dataset={name!r} is unknown; use 'digits', 'synthetic', "
                         "'celeb_a' or 'cub'.")
    tasks = tuple(config.get("tasks", ()))
    return task_subset(dataset, tasks) if tasks else dataset


def build_model(config: ml_collections.ConfigDict, num_tasks: int) -> models.MultiTaskModel:
    """``config.model`` with ``num_tasks``, ``config.sharing`` (None: unrouted), kwargs and
    ``config.dtype`` (the computation dtype, e.g. ``"bfloat16"``; parameters stay float32)."""
    if config.model not in MODELS:
        raise ValueError(f"config.model={config.model!r} is unknown; use one of {list(MODELS)}.")
    kwargs = dict(config.get("model_kwargs", {}))
    if config.get("dtype"):
        kwargs["dtype"] = jax.numpy.dtype(config.dtype)
    return MODELS[config.model](num_tasks=num_tasks, sharing=config.get("sharing"),
                                scheme=config.get("scheme", "random"), **kwargs)


def build_learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int
                        ) -> float | optax.Schedule:
    """``config.learning_rate``, multiplied by ``lr_decay`` every ``lr_decay_epochs`` epochs
    (0: constant) as an optax schedule of the step count."""
    if not config.get("lr_decay_epochs", 0):
        return config.learning_rate
    return optax.exponential_decay(config.learning_rate, config.lr_decay_epochs * steps_per_epoch,
                                   config.get("lr_decay", 0.5), staircase=True)


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                    ) -> optax.GradientTransformation:
    """SGD (with momentum) or Adam at :func:`build_learning_rate`'s rate."""
    lr = build_learning_rate(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.sgd(lr, momentum=config.get("momentum") or None)
    if config.optimizer == "adam":
        return optax.adam(lr)
    raise ValueError(f"config.optimizer={config.optimizer!r} is unknown; use 'sgd' or 'adam'.")


def balanced_tasks(batch_size: int, num_tasks: int, rng: np.random.Generator) -> np.ndarray:
    """(B,) int32 task ids dealt round-robin, then shuffled: with B >= T every task appears."""
    return rng.permutation(np.arange(batch_size) % num_tasks).astype(np.int32)


def route_batch(batch: dict, mode: str, num_tasks: int, rng: np.random.Generator,
                task_order: np.ndarray, step_in_epoch: int, balanced: bool = False) -> dict:
    """Adds ``batch["task"]`` for the routed training modes.

    ``"task_per_batch"`` visits tasks in the epoch's shuffled ``task_order``;
    ``"per_example"`` draws one task per example uniformly or, with ``balanced``, deals them
    (:func:`balanced_tasks`).
    """
    if mode == "task_per_batch":
        return {**batch, "task": np.int32(task_order[step_in_epoch % num_tasks])}
    if mode == "per_example":
        b = len(batch["labels"])
        return {**batch, "task": balanced_tasks(b, num_tasks, rng) if balanced
                else rng.integers(0, num_tasks, b, np.int32)}
    return batch


def affinity_options(config: ml_collections.ConfigDict, steps_per_epoch: int
                     ) -> dict[str, Any]:
    """``make_train_step`` keyword arguments for ``config.affinity`` (empty when off).

    Z is normalized by the optimizer's learning rate at each measured step
    (:func:`build_learning_rate`).
    """
    settings = _affinity_settings(config)
    if not settings:
        return {}
    return {**settings, "lr": build_learning_rate(config, steps_per_epoch),
            "strategy": config.get("strategy", "auto"),
            "affinity_chunk_size": config.get("affinity_chunk_size") or None}


def _affinity_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What ``config.affinity`` measures and how often (defaults filled in); empty when off."""
    if not config.get("affinity"):
        return {}
    return {"affinity": config.affinity, "affinity_every": config.get("affinity_every", 1),
            "affinity_mode": config.get("affinity_mode") or "all_tasks",
            "lookahead": config.get("lookahead", "sgd")}


def training_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint's run, for its fingerprint:
    those that change what a step trains or measures, with the values the run uses (defaults
    filled in; the affinity's only when it is measured, ``balanced_tasks`` only when routing
    per example, ``momentum`` only for SGD)."""
    out = {"mode": config.mode, "optimizer": config.optimizer,
           "learning_rate": config.learning_rate,
           "lr_decay_epochs": config.get("lr_decay_epochs", 0) or None}
    if config.optimizer == "sgd":
        out["momentum"] = config.get("momentum") or None
    if out["lr_decay_epochs"]:
        out["lr_decay"] = config.get("lr_decay", 0.5)
    if config.mode == "per_example":
        out["balanced_tasks"] = bool(config.get("balanced_tasks", False))
    return {**out, **_affinity_settings(config)}


def balanced_routing(config: ml_collections.ConfigDict, num_tasks: int) -> bool:
    """Whether the run deals per-example task ids (``config.balanced_tasks`` with
    ``mode="per_example"``, :func:`balanced_tasks`); raises when a batch cannot hold every
    task."""
    balanced = config.mode == "per_example" and bool(config.get("balanced_tasks", False))
    if balanced and config.batch_size < num_tasks:
        raise ValueError(f"config.balanced_tasks needs config.batch_size >= {num_tasks} tasks "
                         f"(every task in every batch); got {config.batch_size}.")
    return balanced


Step = Any  # (state, batch) -> outputs


def build_steps(config: ml_collections.ConfigDict, model: models.MultiTaskModel,
                optimizer: optax.GradientTransformation, sample: dict,
                steps_per_epoch: int) -> tuple[train.TrainState, Step, Step]:
    """The initial train state and the ``(state, batch)`` train and eval steps.

    Without ``config.mesh`` they are jitted for the default device. With ``config.mesh =
    {"data": d, "task": t}`` (0: the remaining devices, :func:`tr_jax.sharding.make_mesh`;
    multi-host after :func:`tr_jax.sharding.initialize_distributed`) the state is created in
    its shardings and the steps are jitted over the mesh (the lookahead affinity's source tasks
    split over ``"task"``). Every process passes the same global batches; each feeds its own
    rows. Eval batches are padded to a multiple of the data axis with masked-out rows, so the
    counts are those of the unpadded batch.
    """
    key = jax.random.key(config.seed)
    chunk_size = config.get("chunk_size") or None
    step_kwargs = {"mode": config.mode, "chunk_size": chunk_size,
                   **affinity_options(config, steps_per_epoch)}
    if not config.get("mesh"):
        return (train.create_train_state(model, optimizer, key, sample),
                train.make_train_step(model, optimizer, **step_kwargs),
                train.make_eval_step(model, chunk_size=chunk_size))
    mesh = sharding.mesh_from_config(config)
    state = sharding.create_sharded_train_state(model, optimizer, key, sample, mesh)
    sharded_train = sharding.shard_train_step(model, optimizer, mesh, state, **step_kwargs)
    sharded_eval = sharding.shard_eval_step(model, mesh, state, chunk_size=chunk_size)
    local = functools.partial(sharding.host_local_batch, mesh=mesh)
    pad = functools.partial(sharding.pad_batch, multiple=mesh.shape[sharding.DATA])
    return (state, lambda st, batch: sharded_train(st, local(batch)),
            lambda st, batch: sharded_eval(st, local(pad(batch))))


def _strict_json(value: Any) -> Any:
    """``value`` (nested dicts and lists) with NaN as None, so ``json.dump`` writes ``null``
    (strict JSON) for a task or pair that was never measured."""
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    return value


def save_affinity(workdir: str, matrix: np.ndarray, task_names: tuple[str, ...]) -> None:
    """Writes the run-averaged affinity as ``affinity.npy``, ``affinity.json``
    ({"task_names", "matrix", "orientation"}; pairs never measured are null) and the heatmap
    ``affinity.png``, by process 0."""
    if jax.process_index() != 0:
        return
    np.save(os.path.join(workdir, "affinity.npy"), matrix)
    with open(os.path.join(workdir, "affinity.json"), "w") as f:
        json.dump({"task_names": list(task_names), "orientation": "Z[source, target]",
                   "matrix": _strict_json(np.asarray(matrix).tolist())}, f, allow_nan=False)
    plots.affinity_heatmap(matrix, task_names, path=os.path.join(workdir, "affinity.png"))


@dataclasses.dataclass
class EarlyStopping:
    """Stops after ``patience`` epochs without a lower validation error (0: never stops).

    The error is 1 - mean accuracy over tasks on ``config.validation_split``.
    """

    patience: int = 0
    best: float | None = None
    bad_epochs: int = 0

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def update(self, error: float) -> None:
        if self.best is None or error < self.best:
            self.best, self.bad_epochs = error, 0
        else:
            self.bad_epochs += 1

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume: bool = False) -> dict[str, Any]:
    """Trains ``config`` and evaluates every task on the test split.

    Writes ``metrics.jsonl`` (and TensorBoard events) and ``results.json`` to ``workdir``.
    With ``config.checkpoint_every_steps`` > 0, checkpoints go to ``workdir/checkpoints``
    every that many steps, at the end, and on SIGTERM (saved at the next step boundary, then
    :class:`tr_jax.checkpoint.Preempted` is raised); ``resume=True`` continues from the newest
    intact checkpoint (or starts afresh when there is none) exactly as an uninterrupted run.

    Returns:
      {"task_names", "accuracy" (per task), "balanced_accuracy", "mean_accuracy",
      "mean_balanced_accuracy", "steps"}.
    """
    dataset = build_dataset(config)
    t = dataset.num_tasks
    balanced = balanced_routing(config, t)
    steps_per_epoch = dataset.steps_per_epoch("train", config.batch_size)
    model = build_model(config, t)
    optimizer = build_optimizer(config, steps_per_epoch)
    sample = next(dataset.batches("train", config.batch_size))
    state, train_step, eval_step = build_steps(config, model, optimizer, sample, steps_per_epoch)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   checkpoint.fingerprint(
                                       model, state, dataset.task_names, seed=config.seed,
                                       batch_size=config.batch_size,
                                       steps_per_epoch=steps_per_epoch,
                                       **training_settings(config)),
                                   every_steps=config.get("checkpoint_every_steps", 0),
                                   keep=config.get("keep_checkpoints", 3), config=config)
    state, position, loop, _ = ckpt.start(state, resume)
    begin = position
    stopper = EarlyStopping(config.get("early_stop_patience", 0), **loop.get("early_stop", {}))

    def evaluate(split):
        return train.evaluate(eval_step, state,
                              dataset.batches(split, config.get("eval_batch_size", 256),
                                              shuffle=False, drop_remainder=False))

    total_steps = config.num_epochs * steps_per_epoch
    # Exiting the `with` waits for pending checkpoint saves, also on errors: after a
    # non-finite loss or SIGTERM the newest checkpoint on disk is the last good step.
    with ckpt, contextlib.closing(
            MetricWriter(workdir, resume_step=int(state.step) if resume else None)) as writer, tqdm(
            total=total_steps, initial=int(state.step), desc=f"{config.model} {config.mode}",
            unit="step",
            disable=jax.process_index() != 0 or not config.get("progress", True)) as bar:
        for epoch in range(position.epoch, config.num_epochs):
            if stopper.stop:
                break
            task_order = np.random.default_rng([config.seed, epoch, 1]).permutation(t)
            start = begin.batch if epoch == begin.epoch else 0
            for i, batch in enumerate(dataset.batches("train", config.batch_size, epoch=epoch,
                                                      seed=config.seed, start=start), start):
                rng = np.random.default_rng([config.seed, epoch, 2, i])  # resumable per batch
                batch = route_batch(batch, config.mode, t, rng, task_order, i, balanced)
                if (epoch, i) == (begin.epoch, begin.batch):
                    train.check_batch(batch, t, config.mode, config.get("affinity_mode")
                                      if config.get("affinity") else None)
                state, metrics = train_step(state, batch)
                if not bool(metrics["finite"]):
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {int(state.step)} "
                        f"(epoch {epoch}); the state was left at the last finite step. Lower "
                        "config.learning_rate, or resume from the last checkpoint.")
                bar.update()
                if int(state.step) % config.get("log_every_steps", 50) == 0:
                    writer.write(int(state.step), {"loss": metrics["loss"],
                                                   "grad_norm": metrics["grad_norm"]})
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                position = checkpoint.Position.after(epoch, i, steps_per_epoch)
                if position.batch == 0 and stopper.patience:
                    val = evaluate(config.get("validation_split", "validation"))
                    stopper.update(1.0 - val["mean_accuracy"])
                    writer.write(int(state.step), {"val_mean_accuracy": val["mean_accuracy"]})
                ckpt.step_end(state, position, {"early_stop": stopper.state_dict()})
        ckpt.save(state, position, {"early_stop": stopper.state_dict()}, force=True)
        result = evaluate("test")
        writer.write(int(state.step), {"test_mean_accuracy": result["mean_accuracy"],
                                       "test_mean_balanced_accuracy":
                                           result["mean_balanced_accuracy"]})
    out = {"task_names": list(dataset.task_names), "steps": int(state.step),
           **{k: np.asarray(v).tolist() for k, v in result.items()}}
    if np.any(state.affinity_count):
        out["affinity"] = np.asarray(train.mean_affinity(state)).tolist()
        save_affinity(workdir, np.asarray(out["affinity"]), dataset.task_names)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(_strict_json(out), f, indent=1, allow_nan=False)
    return out


def format_accuracy_table(result: dict[str, Any]) -> str:
    """A plain-text table of per-task and mean accuracy / balanced accuracy."""
    width = max(len(n) for n in result["task_names"]) + 2
    lines = [f"{'task':<{width}}{'accuracy':>10}{'balanced':>10}"]
    for name, acc, bal in zip(result["task_names"], result["accuracy"],
                              result["balanced_accuracy"]):
        lines.append(f"{name:<{width}}{acc:>10.4f}{bal:>10.4f}")
    lines.append(f"{'mean':<{width}}{result['mean_accuracy']:>10.4f}"
                 f"{result['mean_balanced_accuracy']:>10.4f}")
    return "\n".join(lines)

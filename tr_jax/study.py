"""End-to-end task-grouping study: choose groups with TAG, CS and HOA, train them, compare.

The study of Fifty et al. (NeurIPS 2021, §5; DESIGN §3) on any :class:`~tr_jax.data.ArrayDataset`:

1. **Choose.** TAG: one all-task run measuring the lookahead affinity every step. CS: one
   all-task run measuring the gradient cosine similarity (a second run, so that each method's
   cost is its own run; :func:`tr_jax.train.make_train_step` measures one matrix per step). HOA
   (Standley et al. 2020): one network per task and per pair, ``T + T (T - 1) / 2`` runs; their
   validation errors form the HOA matrix. Groups for each number of networks ``k`` come from
   :func:`tr_jax.grouping.select_groups` ("tag" objective for TAG and CS, "hoa" for HOA).
2. **Train** every chosen group from scratch, and the baselines: random partitions (several
   draws), all tasks in one network, one network per task. Each is trained with
   ``config.repeats`` seeds (the selection runs use the first seed only).
3. **Evaluate** each task on the network that serves it (the selection's ``serving``); the
   metric is the total test error ``sum_t (1 - accuracy_t)`` (and its mean over tasks),
   averaged over the seeds.

Every network is the full T-head model; a group network masks the labels of the tasks outside
the group, so its loss, gradients and updates are exactly those of a network with only the
group's heads (the other heads get zero gradients and never move). All runs therefore share one
compiled train step and one compiled eval step: each run costs its steps, not a compilation.
Networks are cached by task set and seed, so no group is trained twice (HOA's single-task
networks serve "one network per task"; the TAG run is the first all-in-one network, as measuring
affinity does not change the update).

Compute is measured, not quoted: per method, the training steps and wall seconds spent to choose
its groups (runs plus validation evaluation plus the selection search), with the one-time XLA
compilation of each step function reported apart.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from tr_jax import grouping, plots, train
from tr_jax.data import ArrayDataset
from tr_jax.experiment import affinity_options, build_dataset, build_model, build_optimizer

METHODS = ("tag", "cs", "hoa")  # selection methods, each with its score matrix
AFFINITY_OF = {"tag": "lookahead", "cs": "cosine"}
BATCH_KEYS = ("image", "labels", "label_mask")
TaskSet = tuple[int, ...]


def hold_out_validation(dataset: ArrayDataset, fraction: float, seed: int) -> ArrayDataset:
    """Splits ``fraction`` of "train" off as "validation" (kept as is when it exists).

    Args:
      dataset: the dataset; its "train" split is split.
      fraction: share of training examples held out, in (0, 1).
      seed: seed of the random split.

    Returns:
      The dataset with splits "train" (the rest), "validation" and the others unchanged.
    """
    if "validation" in dataset.splits:
        return dataset
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must be in (0, 1): {dataset.name} has "
                         "no validation split, HOA needs one.")
    arrays = dataset.splits["train"]
    n = len(arrays["labels"])
    order = np.random.default_rng([seed, 7]).permutation(n)
    cut = int(round(fraction * n))
    splits = {**dataset.splits,
              "train": {k: v[order[cut:]] for k, v in arrays.items()},
              "validation": {k: v[order[:cut]] for k, v in arrays.items()}}
    return dataclasses.replace(dataset, splits=splits)


@dataclasses.dataclass(frozen=True)
class Network:
    """A trained network and its errors.

    Attributes:
      tasks: the task set it was trained on (sorted task indices).
      seed: its training seed (initialization and batch order).
      validation_error: (T,) 1 - accuracy on "validation" (NaN outside ``tasks``).
      test_error: (T,) 1 - accuracy on "test" (NaN outside ``tasks``).
      steps: training steps taken.
      seconds: wall seconds of training and validation (what a selection run costs;
        compilation excluded).
      cpu_seconds: CPU seconds of this process over the same span (all threads): less
        sensitive than wall time to other processes sharing the machine.
      measured: the affinity measured during the run ("lookahead", "cosine", ...) or None.
      affinity: the run-averaged (T, T) affinity ``Z[source, target]`` when measured, else None.
    """

    tasks: TaskSet
    seed: int
    validation_error: np.ndarray
    test_error: np.ndarray
    steps: int
    seconds: float
    cpu_seconds: float
    measured: str | None = None
    affinity: np.ndarray | None = None


class GroupTrainer:
    """Trains and evaluates group networks of one config, sharing compiled steps, with a cache.

    Args:
      config: the study config (model, optimizer, batch size, epochs, affinity options).
      dataset: the dataset with "train", "validation" and "test" splits.
    """

    def __init__(self, config: ml_collections.ConfigDict, dataset: ArrayDataset):
        self.config, self.dataset = config, dataset
        self.num_tasks = dataset.num_tasks
        self.steps_per_epoch = dataset.steps_per_epoch("train", config.batch_size)
        self.steps_per_run = config.num_epochs * self.steps_per_epoch
        self.model = build_model(config, self.num_tasks)
        self.optimizer = build_optimizer(config, self.steps_per_epoch)
        self._sample = self._batch(next(dataset.batches("train", config.batch_size)))
        self._init = jax.jit(functools.partial(train.create_train_state, self.model,
                                               self.optimizer))
        self._eval = train.make_eval_step(self.model)
        self._steps: dict[str | None, Any] = {}
        self.compile_seconds: dict[str, float] = {}
        self.cache: dict[tuple[TaskSet, int], Network] = {}  # (task set, seed) -> network
        self.trained: list[Network] = []  # every run, in order
        self.requests = 0
        start = time.perf_counter()
        state = self._init(jax.random.key(config.seed), self._sample)
        for split in ("validation", "test"):
            self._evaluate(state, split)
        self.compile_seconds["init_and_eval"] = time.perf_counter() - start

    @staticmethod
    def _batch(batch: dict) -> dict:
        return {k: batch[k] for k in BATCH_KEYS}

    def _step(self, affinity: str | None):
        """The compiled train step (plain, or measuring ``affinity``), compiled once, timed."""
        if affinity not in self._steps:
            config = self.config.copy_and_resolve_references()
            with config.unlocked():
                config.affinity = affinity
            step = train.make_train_step(self.model, self.optimizer, mode="all_tasks",
                                         **affinity_options(config, self.steps_per_epoch))
            start = time.perf_counter()
            state = self._init(jax.random.key(config.seed), self._sample)
            self._steps[affinity] = step.lower(state, self._sample).compile()
            self.compile_seconds[affinity or "plain"] = time.perf_counter() - start
        return self._steps[affinity]

    def _evaluate(self, state: train.TrainState, split: str) -> np.ndarray:
        batches = self.dataset.batches(split, self.config.get("eval_batch_size", 512),
                                       shuffle=False, drop_remainder=False)
        return 1.0 - train.evaluate(self._eval, state, batches)["accuracy"]

    def fit(self, tasks: TaskSet, seed: int, affinity: str | None = None) -> Network:
        """Trains a fresh network on ``tasks`` (labels of the other tasks masked), uncached.

        Args:
          tasks: sorted task indices.
          seed: initialization and batch-order seed.
          affinity: also measure this affinity (see :data:`tr_jax.train.AFFINITIES`) every
            ``config.affinity_every`` steps; the tasks should then be all tasks.
        """
        c, step = self.config, self._step(affinity)
        member = np.zeros(self.num_tasks, bool)
        member[list(tasks)] = True
        start, start_cpu = time.perf_counter(), time.process_time()
        state = self._init(jax.random.key(seed), self._sample)
        finite = []
        for epoch in range(c.num_epochs):
            for batch in self.dataset.batches("train", c.batch_size, epoch=epoch, seed=seed):
                batch = self._batch(batch)
                batch["label_mask"] = batch["label_mask"] & member
                state, metrics = step(state, batch)
                finite.append(metrics["finite"])
        if not np.all(jax.device_get(finite)):
            raise FloatingPointError(f"non-finite step training tasks {tasks}; lower "
                                     f"config.learning_rate (now {c.learning_rate}).")
        outside = ~member
        val = np.where(outside, np.nan, self._evaluate(state, "validation"))
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        test = np.where(outside, np.nan, self._evaluate(state, "test"))
        matrix = np.asarray(train.mean_affinity(state), np.float64) if affinity else None
        net = Network(tasks, seed, val, test, int(state.step), seconds, cpu, affinity, matrix)
        self.trained.append(net)
        return net

    def network(self, tasks: Sequence[int], repeat: int = 0) -> Network:
        """The network trained on ``tasks`` with seed ``config.seed + repeat``, trained now
        unless the same task set and seed were."""
        key = tuple(sorted(int(t) for t in tasks))
        if not key or len(set(key)) != len(key) or not 0 <= key[0] <= key[-1] < self.num_tasks:
            raise ValueError(f"tasks={tasks} must be distinct task indices in "
                             f"[0, {self.num_tasks}).")
        seed = self.config.seed + int(repeat)
        self.requests += 1
        if (key, seed) not in self.cache:
            self.cache[key, seed] = self.fit(key, seed, None)
        return self.cache[key, seed]

    def affinity_run(self, affinity: str) -> Network:
        """One all-task run (seed ``config.seed``) measuring ``affinity`` ("lookahead",
        "cosine", ...) every ``config.affinity_every`` steps; the first such run also serves as
        the all-task network (measuring affinity leaves the update as it is)."""
        everything = tuple(range(self.num_tasks))
        net = self.fit(everything, self.config.seed, affinity)
        self.cache.setdefault((everything, self.config.seed), net)
        return net


def hoa_matrix(trainer: GroupTrainer) -> tuple[np.ndarray, list[Network]]:
    """Higher-order approximation scores from single-task and pairwise networks.

    Returns:
      ``scores`` (T, T): ``scores[s, t]`` = validation error of task t in the network trained
      on {s, t}, ``scores[t, t]`` = its single-task validation error (the "hoa" orientation of
      :mod:`tr_jax.grouping`); and the T + T (T - 1) / 2 networks used.
    """
    scores = np.empty((trainer.num_tasks,) * 2)
    nets = []
    for tasks in hoa_task_sets(trainer.num_tasks):
        net = trainer.network(tasks)
        nets.append(net)
        a, b = tasks[0], tasks[-1]
        scores[a, b], scores[b, a] = net.validation_error[b], net.validation_error[a]
    return scores, nets


def hoa_task_sets(num_tasks: int) -> list[TaskSet]:
    """The T single tasks and T (T - 1) / 2 pairs HOA trains, ``(a,)`` before ``(a, b > a)``."""
    return [(a, b) if a != b else (a,) for a in range(num_tasks) for b in range(a, num_tasks)]


def random_partition(num_tasks: int, num_groups: int, rng: np.random.Generator
                     ) -> list[TaskSet]:
    """A uniformly random assignment of the tasks to ``num_groups`` non-empty groups."""
    if not 1 <= num_groups <= num_tasks:
        raise ValueError(f"num_groups={num_groups} must be in [1, {num_tasks}].")
    while True:
        labels = rng.integers(num_groups, size=num_tasks)
        if len(np.unique(labels)) == num_groups:
            return [tuple(np.flatnonzero(labels == g).tolist()) for g in range(num_groups)]


def serve(trainer: GroupTrainer, groups: Sequence[Sequence[int]],
          serving: Sequence[int] | None = None, repeats: int = 1) -> dict[str, Any]:
    """Trains (or fetches) each group and reads every task from its serving network.

    Args:
      trainer: the group trainer.
      groups: the groups (they must cover every task).
      serving: per task, the index of its serving group; by default the only group holding it
        (groups must then be disjoint).
      repeats: train each group with this many seeds and average the errors over them.

    Returns:
      {"groups", "serving", "per_task_error" (T,): test error averaged over the repeats,
      "total_error" (its sum), "mean_error" (its mean), "total_error_repeats" (one total per
      seed)}.
    """
    groups = [tuple(sorted(int(i) for i in g)) for g in groups]
    if serving is None:
        owner = {t: i for i, g in enumerate(groups) for t in g}
        if sum(map(len, groups)) != len(owner):
            raise ValueError(f"groups {groups} overlap; pass serving= to say which serves whom.")
        serving = [owner[t] for t in range(trainer.num_tasks)]
    if len(serving) != trainer.num_tasks or any(
            not 0 <= s < len(groups) or t not in groups[s] for t, s in enumerate(serving)):
        raise ValueError(f"serving={list(serving)} must name, for each of the "
                         f"{trainer.num_tasks} tasks, a group in {groups} that contains it.")
    errors = []
    for r in range(repeats):
        nets = [trainer.network(g, r) for g in groups]
        errors.append([nets[s].test_error[t] for t, s in enumerate(serving)])
    errors = np.array(errors)
    error = errors.mean(0)
    return {"groups": [list(g) for g in groups], "serving": [int(s) for s in serving],
            "per_task_error": error.tolist(), "total_error": float(error.sum()),
            "mean_error": float(error.mean()),
            "total_error_repeats": errors.sum(1).tolist()}


def _cost(nets: Sequence[Network], compile_seconds: float, select_seconds: float
          ) -> dict[str, Any]:
    train_s = sum(n.seconds for n in nets)
    return {"runs": len(nets), "steps": int(sum(n.steps for n in nets)),
            "train_seconds": train_s, "cpu_seconds": sum(n.cpu_seconds for n in nets),
            "compile_seconds": compile_seconds,
            "select_seconds": select_seconds,
            "seconds": train_s + select_seconds,
            "seconds_with_compile": train_s + select_seconds + compile_seconds}


def _log(config, message: str) -> None:
    if config.get("progress", True):
        print(f"[study] {message}", flush=True)


def _choose(trainer: GroupTrainer, config: ml_collections.ConfigDict
            ) -> tuple[dict[str, np.ndarray], dict[str, list[Network]]]:
    """The score matrix of each method and the runs it took (TAG, CS: one; HOA: T + T(T-1)/2)."""
    matrices, nets = {}, {}
    for method, affinity in AFFINITY_OF.items():
        net = trainer.affinity_run(affinity)
        matrices[method], nets[method] = net.affinity, [net]
        _log(config, f"{method}: one all-task run measuring {affinity} "
                     f"({net.seconds:.1f} s)")
    matrices["hoa"], nets["hoa"] = hoa_matrix(trainer)
    _log(config, f"hoa: {len(nets['hoa'])} single-task and pairwise runs "
                 f"({sum(n.seconds for n in nets['hoa']):.1f} s)")
    return matrices, nets


def _compare(trainer: GroupTrainer, config: ml_collections.ConfigDict,
             matrices: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, float]]:
    """Selects, trains and evaluates the groups of every method and baseline.

    Returns:
      (the ``methods`` entry of the results, selection-search seconds per method).
    """
    t, repeats = trainer.num_tasks, config.get("repeats", 1)
    methods: dict[str, Any] = {m: {} for m in METHODS}
    select_seconds = dict.fromkeys(METHODS, 0.0)
    for method in METHODS:
        for k in config.group_counts:
            start = time.perf_counter()
            choice = grouping.select_groups(matrices[method], int(k),
                                            objective="hoa" if method == "hoa" else "tag",
                                            method=config.get("selection_method", "auto"))
            select_seconds[method] += time.perf_counter() - start
            methods[method][str(k)] = {**serve(trainer, choice.groups, choice.serving, repeats),
                                       "selection_score": choice.score}
    methods["all_in_one"] = serve(trainer, [range(t)], repeats=repeats)
    methods["one_per_task"] = serve(trainer, [(i,) for i in range(t)], repeats=repeats)
    methods["random"] = {}
    for k in config.group_counts:
        runs = [serve(trainer, random_partition(t, int(k), np.random.default_rng([seed, k])),
                      repeats=repeats) for seed in range(config.get("random_seeds", 5))]
        totals = np.array([r["total_error"] for r in runs])
        methods["random"][str(k)] = {
            "total_error_mean": float(totals.mean()), "total_error_std": float(totals.std()),
            "total_error_min": float(totals.min()), "total_error_max": float(totals.max()),
            "mean_error_mean": float(totals.mean() / t), "seeds": runs}
    return methods, select_seconds


def run_study(config: ml_collections.ConfigDict, workdir: str, *,
              dataset: ArrayDataset | None = None) -> dict[str, Any]:
    """Runs the whole study and writes ``study.json``, ``study.md`` and figures.

    Args:
      config: an experiment config (see ``experiments/configs/study_digits.py``) with, besides
        the usual model/optimizer/data fields: ``group_counts`` (numbers of networks k to
        select), ``random_seeds`` (random partitions per k), ``repeats`` (training seeds each
        evaluated group is trained with; errors are averaged over them -- the selection runs
        use the first seed only), ``validation_fraction`` (held out of "train" when the dataset
        has no "validation" split), ``selection_method`` (for
        :func:`tr_jax.grouping.select_groups`), ``affinity_every`` and ``lookahead``.
      workdir: output directory.
      dataset: the tasks to study; by default ``build_dataset(config)``.

    Returns:
      The results dict (what ``study.json`` holds): ``task_names``, ``group_counts``,
      ``methods`` (``all_in_one``, ``one_per_task``: one served result each; ``tag``, ``cs``,
      ``hoa``: {k: served result + ``selection_score``}; ``random``: {k: summary + ``seeds``}),
      ``matrices`` (``tag``, ``cs``: ``Z[source, target]``; ``hoa``: ``scores[source, target]``),
      ``networks`` (every training run in order: tasks, seed, affinity measured, steps, seconds,
      per-task validation and test error, None outside its tasks), ``selection_cost`` per
      method, ``speedup`` (HOA over TAG), ``training`` (counts and compile seconds),
      ``planted_groups`` and ``environment``.
    """
    wall = time.perf_counter()
    load_before = os.getloadavg()
    dataset = hold_out_validation(dataset or build_dataset(config),
                                  config.get("validation_fraction", 0.2), config.seed)
    t = dataset.num_tasks
    if t < 2 or any(not 1 <= int(k) <= t for k in config.group_counts):
        raise ValueError(f"config.group_counts={tuple(config.group_counts)} must lie in "
                         f"[1, T={t}] with T >= 2.")
    trainer = GroupTrainer(config, dataset)
    _log(config, f"{t} tasks, {trainer.steps_per_run} steps per network")
    matrices, nets = _choose(trainer, config)
    methods, select_seconds = _compare(trainer, config, matrices)
    _log(config, f"trained {len(trainer.trained)} networks for {trainer.requests} requests")

    compile_of = {"tag": "lookahead", "cs": "cosine", "hoa": "plain"}
    cost = {m: _cost(nets[m], trainer.compile_seconds[compile_of[m]], select_seconds[m])
            for m in METHODS}
    results = {
        "task_names": list(dataset.task_names),
        "group_counts": [int(k) for k in config.group_counts], "methods": methods,
        "matrices": {m: np.asarray(v).tolist() for m, v in matrices.items()},
        "orientation": "matrices[m][source][target]; hoa: error of target trained with source, "
                       "diagonal = single-task validation error",
        "selection_cost": cost,
        "speedup": {"hoa_over_tag_steps": cost["hoa"]["steps"] / cost["tag"]["steps"],
                    "hoa_over_tag_seconds": cost["hoa"]["seconds"] / cost["tag"]["seconds"],
                    "hoa_over_tag_cpu_seconds":
                        cost["hoa"]["cpu_seconds"] / cost["tag"]["cpu_seconds"],
                    "hoa_over_tag_seconds_with_compile":
                        cost["hoa"]["seconds_with_compile"]
                        / cost["tag"]["seconds_with_compile"]},
        "networks": [{"tasks": list(n.tasks), "seed": n.seed, "measured": n.measured,
                      "steps": n.steps, "seconds": n.seconds, "cpu_seconds": n.cpu_seconds,
                      "validation_error": _finite_or_none(n.validation_error),
                      "test_error": _finite_or_none(n.test_error)} for n in trainer.trained],
        "training": {"networks_trained": len(trainer.trained), "requests": trainer.requests,
                     "steps_per_network": trainer.steps_per_run,
                     "repeats": config.get("repeats", 1),
                     "compile_seconds": trainer.compile_seconds},
        "planted_groups": None if dataset.groups is None else [list(g) for g in dataset.groups],
        "config": config.to_dict(),
    }
    results["environment"] = {
        "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - wall}
    write_results(results, workdir)
    return results


def write_results(results: dict[str, Any], workdir: str) -> None:
    """Writes ``study.json``, ``study.md`` (:func:`format_study_table`), ``study.png``
    (:func:`plot_study`) and ``affinity_tag.png`` (the TAG matrix with its groups for the
    largest k, :func:`tr_jax.plots.affinity_heatmap`)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "study.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(format_study_table(results) + "\n")
    plot_study(results, os.path.join(workdir, "study.png"))
    k = str(max(results["group_counts"]))
    plots.affinity_heatmap(results["matrices"]["tag"], results["task_names"],
                           groups=results["methods"]["tag"][k]["groups"],
                           path=os.path.join(workdir, "affinity_tag.png"),
                           title=f"TAG lookahead affinity, groups for k = {k}")


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    """Per-task values for JSON, None for the tasks a network does not have (NaN)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _total_cell(entry: dict[str, Any]) -> str:
    spread = np.std(entry["total_error_repeats"])
    return f"{entry['total_error']:.4f}" + (f" ± {spread:.4f}" if spread else "")


def _error_table(results: dict[str, Any]) -> list[str]:
    names, counts, m = results["task_names"], results["group_counts"], results["methods"]
    repeats = results["training"]["repeats"]
    seeds = len(m["random"][str(counts[0])]["seeds"])
    note = (f"mean over {repeats} training seeds ± their std; " if repeats > 1 else "")
    lines = [f"### Total test error over {len(names)} tasks (sum of 1 - accuracy; {note}"
             f"divide by {len(names)} for the mean per task)", "",
             "| method | " + " | ".join(f"{k} networks" for k in counts) + " |",
             "|---" * (len(counts) + 1) + "|"]
    for key, label in (("tag", "TAG"), ("cs", "CS"), ("hoa", "HOA")):
        lines.append(f"| {label} | " + " | ".join(_total_cell(m[key][str(k)])
                                                  for k in counts) + " |")
    cells = [f"{r['total_error_mean']:.4f} ± {r['total_error_std']:.4f}"
             for r in (m["random"][str(k)] for k in counts)]
    lines.append(f"| random ({seeds} partitions, mean ± std) | " + " | ".join(cells) + " |")
    for key, label in (("all_in_one", "all tasks in 1 network"),
                       ("one_per_task", f"1 network per task ({len(names)})")):
        lines.append(f"| {label} | " + " | ".join([_total_cell(m[key])] * len(counts)) + " |")
    return lines


def _cost_table(results: dict[str, Any]) -> list[str]:
    cost, speed, t = results["selection_cost"], results["speedup"], len(results["task_names"])
    lines = ["### Compute spent choosing the groups", "",
             "| method | runs | training steps | runs + validation s (CPU s) | selection s | "
             "total s | XLA compile s |", "|---|---|---|---|---|---|---|"]
    for key, label in (("tag", "TAG (1 run, lookahead)"), ("cs", "CS (1 run, cosine)"),
                       ("hoa", f"HOA ({t} + {t * (t - 1) // 2} runs)")):
        c = cost[key]
        lines.append(f"| {label} | {c['runs']} | {c['steps']} | {c['train_seconds']:.2f} "
                     f"({c['cpu_seconds']:.2f}) | "
                     f"{c['select_seconds']:.2f} | {c['seconds']:.2f} | "
                     f"{c['compile_seconds']:.2f} |")
    return lines + ["", f"HOA / TAG: {speed['hoa_over_tag_steps']:.1f}x the training steps, "
                        f"{speed['hoa_over_tag_seconds']:.1f}x the wall seconds, "
                        f"{speed['hoa_over_tag_cpu_seconds']:.1f}x the CPU seconds "
                        f"({speed['hoa_over_tag_seconds_with_compile']:.1f}x the wall seconds "
                        "counting each method's one-time XLA compilation)."]


def _named(names: Sequence[str], groups: Sequence[Sequence[int]]) -> str:
    return " ".join("{" + ", ".join(names[i] for i in g) + "}" for g in groups)


def _groups_table(results: dict[str, Any]) -> list[str]:
    names, m = results["task_names"], results["methods"]
    lines = ["### Chosen groups (overlapping groups serve each task from its best one)", "",
             "| method | k | groups |", "|---|---|---|"]
    for key, label in (("tag", "TAG"), ("cs", "CS"), ("hoa", "HOA")):
        for k in results["group_counts"]:
            groups = m[key][str(k)]["groups"]
            lines.append(f"| {label} | {k} | {_named(names, groups)} |")
    if results.get("planted_groups"):
        lines += ["", f"Planted groups: {_named(names, results['planted_groups'])}"]
    return lines


def _per_task_table(results: dict[str, Any]) -> list[str]:
    names, counts, m = results["task_names"], results["group_counts"], results["methods"]
    head = ["all in 1", "1 per task"] + [f"{label}@{k}" for label in ("TAG", "CS", "HOA")
                                         for k in counts]
    entries = [m["all_in_one"], m["one_per_task"]] + [m[key][str(k)] for key in METHODS
                                                      for k in counts]
    lines = ["### Per-task test error", "", "| task | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{e['per_task_error'][i]:.4f}"
                                                 for e in entries) + " |")
    return lines


def format_study_table(results: dict[str, Any]) -> str:
    """The study as Markdown: total test error per method and k, the cost of choosing the
    groups, the chosen groups and the per-task errors."""
    env, training = results["environment"], results["training"]
    footer = (f"Study wall time {env['wall_seconds']:.1f} s on {env['cpus']} CPUs "
              f"({env['backend']}, jax {env['jax']}); load average "
              f"{env['load_average_before'][0]:.1f} before, "
              f"{env['load_average_after'][0]:.1f} after; {training['networks_trained']} "
              f"networks trained ({training['requests']} requests), "
              f"{training['steps_per_network']} steps each.")
    parts = [_error_table(results), _cost_table(results), _groups_table(results),
             _per_task_table(results), [footer]]
    return "\n\n".join("\n".join(part) for part in parts)


def plot_study(results: dict[str, Any], path: str) -> None:
    """Total test error against the number of networks k, per method (a PNG at ``path``).

    Drawn with matplotlib's object API on the Agg canvas, as :mod:`tr_jax.plots`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts, m = results["group_counts"], results["methods"]
    t = len(results["task_names"])
    fig = Figure(figsize=(7.5, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("tag", "TAG", dict(marker="o", lw=3, alpha=0.8)),
                              ("cs", "CS", dict(marker="s", ls="--", ms=5)),
                              ("hoa", "HOA", dict(marker="^"))):
        ax.plot(counts, [m[key][str(k)]["total_error"] for k in counts], label=label, **style)
    rnd = [m["random"][str(k)] for k in counts]
    ax.errorbar(counts, [r["total_error_mean"] for r in rnd],
                yerr=[r["total_error_std"] for r in rnd], fmt="x:", color="gray", capsize=3,
                label="random (mean ± std)")
    baselines = (m["all_in_one"]["total_error"], m["one_per_task"]["total_error"])
    ax.axhline(baselines[0], color="k", ls=":", label="all in 1 network")
    ax.axhline(baselines[1], color="tab:red", ls="-.", label=f"1 network per task ({t})")
    low, high = ax.get_ylim()
    pad = 0.05 * (max(high, *baselines) - min(low, *baselines))
    ax.set_ylim(min(low, min(baselines) - pad), max(high, max(baselines) + pad))
    ax.set_xticks(counts)
    ax.set_xlabel("number of networks k")
    ax.set_ylabel("total test error (sum over tasks)")
    ax.set_title(f"Task grouping on {t} tasks")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, format="png")

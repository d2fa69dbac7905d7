"""Scaling: sharded train and TAG-affinity steps vs device count and task count, and the
312-task run.

Parts (each device count runs in its own process, as JAX fixes the device count at start):

* ``devices`` -- step time on 1, 2, 4, 8 fake CPU devices: the train step data-parallel on a
  (n, 1) mesh, the train step with affinity task-parallel on a (1, n) mesh (T = 40).
* ``tasks`` -- step time and compiled memory at T = 9, 40, 100, 312 on one device.
* ``memory`` -- per-device memory XLA plans (compile only) for the T = 312 affinity step,
  unchunked (all the device's tasks vmapped at once) vs chunked, on 1 and 8 devices.
* ``precision`` -- the digits quickstart trained with float32 and bfloat16 compute.
* ``scale`` -- the end-to-end 312-task run of ``experiments/configs/vgg312_scale.py``.

Fake CPU devices split the same 2 cores: they show that the sharded steps run and what the
partitioning costs, not a speed-up. Model: routed VGG-11 (width 1/8) on 8x8x1 inputs,
per-example routing, every task in every batch. Timings are medians of interleaved repeats.

Usage:
  python benchmarks/scaling.py                      # devices, tasks, memory, scale(runlocal)
  python benchmarks/scaling.py --parts devices --reps 5
  python benchmarks/scaling.py --scale experiments/configs/vgg312_scale.py:runlocal \
      --workdir runs/vgg312_local [--devices 8] [--config.field=value ...]
Writes benchmarks/results/scaling.json and scaling.md (parts runs only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import rotated  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASK_COUNTS = (9, 40, 100, 312)
DEVICE_COUNTS = (1, 2, 4, 8)
WIDTH = 0.125  # VGG-11 width multiplier of the benchmark model
CHUNK = 8      # source tasks per chunk on each device


def _start_jax(devices: int | None) -> None:
    """Configures JAX (before its backend starts): CPU, ``devices`` fake devices, and
    :func:`tr_jax.cpu_runtime.configure` as the tr-jax command line does."""
    import jax

    from tr_jax import cpu_runtime
    cpu_runtime.configure()
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))
    if devices:
        jax.config.update("jax_num_cpu_devices", devices)


# ------------------------------------------------------------------------------ data helpers

def batch_size_for(num_tasks: int, multiple: int = 8) -> int:
    """The smallest batch >= max(T, 64) divisible by ``multiple`` (every task in a batch)."""
    return multiple * math.ceil(max(num_tasks, 64) / multiple)


def digit_subset_tasks(num_tasks: int, seed: int = 0):
    """The offline 8x8 digits with ``num_tasks`` fabricated binary tasks.

    Task k is "the digit lies in S_k" for distinct random subsets S_k of {0..9} with 1 to 9
    members (1022 exist). Real images, made-up tasks.

    Returns:
      An ArrayDataset like :func:`tr_jax.data.load_digits` with ``num_tasks`` label columns.
    """
    import dataclasses

    import numpy as np

    from tr_jax.data import load_digits
    if not 1 <= num_tasks <= 1022:
        raise ValueError(f"num_tasks={num_tasks} must lie in [1, 1022] (non-trivial subsets "
                         "of 10 digits).")
    codes = np.random.default_rng(seed).choice(np.arange(1, 1023), num_tasks, replace=False)
    members = (codes[None, :] >> np.arange(10)[:, None]) & 1  # (digit, task)
    names = tuple("in_" + "".join(str(d) for d in range(10) if m[d]) for m in members.T)
    base = load_digits()
    splits = {name: {**arrays, "labels": members[arrays["digit"]].astype(np.int32),
                     "label_mask": np.ones((len(arrays["digit"]), num_tasks), bool)}
              for name, arrays in base.splits.items()}
    return dataclasses.replace(base, name="digits_subsets", task_names=names, splits=splits)


def random_batches(num_tasks: int, batch_size: int, count: int, seed: int = 0) -> list[dict]:
    """Random 8x8x1 images and labels with balanced per-example task ids."""
    import numpy as np

    from tr_jax.experiment import balanced_tasks
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32),
             "labels": rng.integers(0, 2, (batch_size, num_tasks)).astype(np.int32),
             "task": balanced_tasks(batch_size, num_tasks, rng)} for _ in range(count)]


# -------------------------------------------------------------------------------- measuring

def memory_of(compiled) -> dict[str, int]:
    """Per-device bytes XLA planned: arguments, outputs, temporaries, and their peak."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                              "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def build_step(num_tasks: int, mesh_shape, *, affinity: bool, strategy: str = "chunked",
               chunk: int | None = CHUNK, width: float = WIDTH, image=(8, 8, 1),
               batch_size: int | None = None):
    """A compiled sharded train step (optionally with affinity every step) and its inputs."""
    import jax
    import optax

    from tr_jax import models, sharding
    model = models.RoutedVGG(num_tasks=num_tasks, sharing=0.5, width_multiplier=width)
    tx = optax.sgd(0.01, momentum=0.9)
    mesh = sharding.make_mesh(*mesh_shape)
    b = batch_size or batch_size_for(num_tasks)
    sample = {"image": jax.numpy.zeros((b, *image))}
    state = sharding.create_sharded_train_state(model, tx, jax.random.key(0), sample, mesh)
    kwargs = dict(mode="per_example")
    if affinity:
        kwargs.update(affinity="lookahead", affinity_mode="per_example", lr=0.01,
                      strategy=strategy, affinity_chunk_size=chunk)
    step = sharding.shard_train_step(model, tx, mesh, state, **kwargs)
    abstract = {"image": jax.ShapeDtypeStruct((b, *image), jax.numpy.float32),
                "labels": jax.ShapeDtypeStruct((b, num_tasks), jax.numpy.int32),
                "task": jax.ShapeDtypeStruct((b,), jax.numpy.int32)}
    t0 = time.perf_counter()
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sharding.batch_sharding(mesh, len(a.shape))), abstract)
    compiled = step.jitted.lower(state, placed).compile()
    return {"compiled": compiled, "state": state, "mesh": mesh, "batch_size": b,
            "compile_s": time.perf_counter() - t0, "memory": memory_of(compiled)}


def run_jobs(jobs: list[dict], reps: int) -> list[dict]:
    """Compiles every job, then times them round-robin ``reps`` times (medians)."""
    import jax
    import numpy as np

    from tr_jax import sharding
    built = []
    for job in jobs:
        b = build_step(job["T"], job["mesh"], affinity=job["affinity"],
                       strategy=job.get("strategy", "chunked"), chunk=job.get("chunk", CHUNK),
                       width=job.get("width", WIDTH), image=tuple(job.get("image", (8, 8, 1))),
                       batch_size=job.get("B"))
        if job.get("compile_only"):
            b["state"] = None
        else:
            batches = random_batches(job["T"], b["batch_size"], 2)
            b["batches"] = [sharding.shard_batch(x, b["mesh"]) for x in batches]
            b["state"], m = b["compiled"](b["state"], b["batches"][0])  # warm-up
            jax.block_until_ready(m)
        b["times"] = []
        built.append(b)
    for r in range(reps):
        for b in rotated(built, r):
            if b["state"] is None:
                continue
            t0 = time.perf_counter()
            b["state"], m = b["compiled"](b["state"], b["batches"][r % 2])
            jax.block_until_ready(m)
            b["times"].append(time.perf_counter() - t0)
    return [{**job, "batch_size": b["batch_size"], "compile_s": round(b["compile_s"], 2),
             "step_s": float(np.median(b["times"])) if b["times"] else None,
             "step_s_all": [round(t, 4) for t in b["times"]], "memory": b["memory"]}
            for job, b in zip(jobs, built)]


def worker(spec: dict) -> None:
    """Runs ``spec["jobs"]`` on ``spec["devices"]`` devices; prints one JSON line."""
    _start_jax(spec["devices"])
    results = run_jobs(spec["jobs"], spec["reps"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"devices": spec["devices"], "max_rss": rss,
                                  "results": results}))


def result_of(args: list[str], what: str) -> dict:
    """Runs this script with ``args`` in a fresh process; returns its ``RESULT`` JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    print(f"  {what}: done", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def spawn(devices: int, jobs: list[dict], reps: int) -> dict:
    """Runs a worker process with ``devices`` fake CPU devices and returns its results."""
    spec = json.dumps({"devices": devices, "jobs": jobs, "reps": reps})
    return result_of(["--worker", spec], f"{devices} device(s), {len(jobs)} job(s)")


# ------------------------------------------------------------------------------------ parts

def part_devices(reps: int, rounds: int) -> list[dict]:
    """Train step on (n, 1) and train+affinity step on (1, n), T = 40, n in DEVICE_COUNTS."""
    rows = []
    for _ in range(rounds):  # rounds interleave the device counts
        for n in DEVICE_COUNTS:
            jobs = [{"T": 40, "mesh": [n, 1], "affinity": False},
                    {"T": 40, "mesh": [1, n], "affinity": True}]
            rows.append(spawn(n, jobs, reps))
    return rows


def part_tasks(reps: int) -> list[dict]:
    """Train step and train+affinity step at each T in TASK_COUNTS, one device."""
    jobs = [{"T": t, "mesh": [1, 1], "affinity": a} for t in TASK_COUNTS for a in (False, True)]
    return [spawn(1, jobs, reps)]


def part_memory() -> list[dict]:
    """Compile-only memory of the T = 312 train+affinity step, unchunked vs chunked."""
    rows = []
    for n in (1, 8):
        jobs = [{"T": 312, "mesh": [1, n], "affinity": True, "strategy": s, "chunk": c,
                 "compile_only": True}
                for s, c in (("vmap", None), ("chunked", 8), ("chunked", 1))]
        jobs.append({"T": 312, "mesh": [1, n], "affinity": False, "compile_only": True})
        rows.append(spawn(n, jobs, 0))
    return rows


def part_precision() -> list[dict]:
    """The digits quickstart (experiments/configs/digits.py) in float32 and bfloat16 compute."""
    return [result_of(["--precision", dtype], f"digits in {dtype}")
            for dtype in ("float32", "bfloat16")]


def run_precision(dtype: str) -> dict:
    """Trains the digits quickstart with ``dtype`` compute (parameters stay float32)."""
    import tempfile

    import jax.numpy as jnp

    from tr_jax import experiment
    config = load_config(str(ROOT / "experiments" / "configs" / "digits.py"), [])
    with config.unlocked():
        config.model_kwargs.dtype = jnp.dtype(dtype)
        config.progress = False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        result = experiment.train_and_evaluate(config, workdir)
    return {"dtype": dtype, "wall_s": round(time.perf_counter() - t0, 1),
            "mean_accuracy": result["mean_accuracy"],
            "mean_balanced_accuracy": result["mean_balanced_accuracy"]}


def part_memory_full() -> list[dict]:
    """Compile-only memory of the full-size T = 312 step: VGG-11 (width 1), 64x64x3, batch 624,
    unchunked vs chunked affinity, on 1 and 8 task devices."""
    full = {"T": 312, "width": 1.0, "image": [64, 64, 3], "B": 624, "compile_only": True}
    rows = []
    for n in (1, 8):
        jobs = [{**full, "mesh": [1, n], "affinity": True, "strategy": "chunked", "chunk": c}
                for c in (8, 1)]
        jobs.append({**full, "mesh": [1, n], "affinity": False})
        if n == 8:
            jobs.append({**full, "mesh": [1, n], "affinity": True, "strategy": "vmap",
                         "chunk": None})
        rows.append(spawn(n, jobs, 0))
    return rows


# ------------------------------------------------------------------------------ scale run

def load_config(path: str, overrides: list[str]):
    from tr_jax.cli import load_config as cli_load
    return cli_load(path, overrides)


def run_scale(config, workdir: str) -> dict:
    """Trains ``config`` (vgg312_scale.py) with the sharded step and writes results.json.

    Builds the mesh from ``config.mesh``, the state directly in its shardings, the train step
    with in-step task-parallel affinity, evaluates every task on the test split and records
    the compiled per-device memory of both steps and the process's peak RSS.
    """
    import jax
    import numpy as np

    from tr_jax import experiment, sharding, train
    from tr_jax.metrics import MetricWriter

    sharding.initialize_distributed()
    if config.dataset == "digits_subsets":
        dataset = digit_subset_tasks(config.num_tasks, **config.dataset_kwargs)
    else:
        dataset = experiment.build_dataset(config)
    t = dataset.num_tasks
    if not experiment.balanced_routing(config, t):
        raise ValueError("the scale driver routes per example with balanced task ids: set "
                         "config.mode='per_example' and config.balanced_tasks=True.")
    steps_per_epoch = dataset.steps_per_epoch("train", config.batch_size)
    model = experiment.build_model(config, t)
    optimizer = experiment.build_optimizer(config, steps_per_epoch)
    mesh = sharding.mesh_from_config(config)
    sample = next(dataset.batches("train", config.batch_size))
    state = sharding.create_sharded_train_state(model, optimizer, jax.random.key(config.seed),
                                                sample, mesh)
    step = sharding.shard_train_step(model, optimizer, mesh, state, mode=config.mode,
                                     max_traces=1,
                                     **experiment.affinity_options(config, steps_per_epoch))
    eval_step = sharding.shard_eval_step(model, mesh, state,
                                         chunk_size=config.get("chunk_size") or None)
    writer = MetricWriter(workdir)
    times, t_start, compiled_memory, compile_s = [], time.perf_counter(), None, 0.0
    for epoch in range(config.num_epochs):
        rng = np.random.default_rng([config.seed, epoch, 2])
        for batch in dataset.batches("train", config.batch_size, epoch=epoch, seed=config.seed):
            batch = {**batch, "task": experiment.balanced_tasks(len(batch["labels"]), t, rng)}
            batch = sharding.host_local_batch(batch, mesh)
            if compiled_memory is None:
                t0 = time.perf_counter()
                compiled_memory = memory_of(step.lower(state, batch).compile())
                compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            if int(state.step) % config.log_every_steps == 0:
                writer.write(int(state.step), {k: metrics[k] for k in ("loss", "grad_norm")})
    counts = None
    for batch in dataset.batches("test", config.eval_batch_size, shuffle=False,
                                 drop_remainder=False):
        batch = {k: batch[k] for k in ("image", "labels", "label_mask")}
        out = jax.device_get(eval_step(state, sharding.host_local_batch(batch, mesh)))
        counts = out if counts is None else jax.tree.map(np.add, counts, out)
    result = train.summarize_counts(counts)
    z = np.asarray(train.mean_affinity(state))
    writer.write(int(state.step), {"test_mean_accuracy": result["mean_accuracy"]})
    writer.close()
    measured = [tm for i, tm in enumerate(times) if i % config.affinity_every == 0]
    plain = [tm for i, tm in enumerate(times) if i % config.affinity_every]
    out = {"num_tasks": t, "mesh": dict(mesh.shape), "devices": jax.device_count(),
           "processes": jax.process_count(), "batch_size": config.batch_size,
           "steps": int(state.step), "affinity_steps": int(np.max(state.affinity_count)),
           "dtype": config.dtype, "wall_s": round(time.perf_counter() - t_start, 1),
           "compile_s": round(compile_s, 1),
           "affinity_step_s": round(float(np.median(measured)), 3),
           "plain_step_s": round(float(np.median(plain)), 3) if plain else None,
           "compiled_memory_per_device": compiled_memory,
           "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "mean_accuracy": result["mean_accuracy"],
           "mean_balanced_accuracy": result["mean_balanced_accuracy"],
           "affinity_shape": list(z.shape), "affinity_finite": bool(np.isfinite(z).all()),
           "affinity_mean_offdiag": float(np.nanmean(z[~np.eye(t, dtype=bool)])),
           "affinity_mean_diag": float(np.nanmean(np.diag(z))),
           "affinity_vs_label_correlation": label_agreement(z, dataset)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        np.save(os.path.join(workdir, "affinity.npy"), z)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({**out, "task_names": list(dataset.task_names)}, f, indent=1)
    return out


def label_agreement(z, dataset) -> float:
    """Spearman correlation, over task pairs i != j, of Z[i, j] with the correlation of the
    two tasks' training labels (a sanity check: related tasks should help each other)."""
    import numpy as np
    from scipy.stats import spearmanr
    labels = np.asarray(dataset.splits["train"]["labels"], np.float64) if hasattr(
        dataset, "splits") else None
    if labels is None:
        return float("nan")
    off = ~np.eye(len(z), dtype=bool)
    return float(spearmanr(z[off], np.corrcoef(labels.T)[off]).statistic)


def scale_subprocess(config_path: str, workdir: str, devices: int | None) -> dict:
    """Runs the scale part in its own process (fresh JAX with ``devices`` devices)."""
    args = ["--scale", config_path, "--workdir", workdir]
    return result_of(args + (["--devices", str(devices)] if devices else []), "scale run")


# ---------------------------------------------------------------------------------- report

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _memory_rows(runs: list[dict]) -> list[str]:
    """Table rows (devices, step, lookahead, peak, temporaries, compile) of memory jobs."""
    rows = []
    for run in runs:
        for r in run["results"]:
            how = ("-" if not r["affinity"] else "unchunked (vmap)"
                   if r["strategy"] == "vmap" else f"chunks of {r['chunk']}")
            what = "train + affinity" if r["affinity"] else "train"
            rows.append(f"| {run['devices']} | {what} | {how} | {_mib(r['memory']['peak'])} | "
                        f"{_mib(r['memory']['temp'])} | {r['compile_s']:.1f} |")
    return rows


def _full_size_memory(results: dict) -> str:
    """The sentence on the full-size step's planned memory on 8 devices (empty without it)."""
    peaks = {r.get("chunk") if r["strategy"] == "chunked" else "vmap": r["memory"]["peak"] / 2**30
             for run in results.get("memory_full", []) if run["devices"] == 8
             for r in run["results"] if r["affinity"]}
    if set(peaks) != {"vmap", 8, 1}:
        return ""
    return (f" The full-size model needs ~{peaks['vmap']:.0f} GiB per device unchunked even on "
            f"8 devices; chunks of 8 need ~{peaks[8]:.0f} GiB (an 80 GB accelerator holds "
            f"74.5 GiB), chunks of 1 ~{peaks[1]:.1f} GiB.")


def _measured(results: dict, part: str) -> list[str]:
    """The line under a part's heading: when and on which machine that part was measured."""
    m = results["measured"][part]
    return [f"Measured {m['date']} on {m['machine']}.", ""]


def markdown(results: dict) -> str:
    """The "Scaling" README section from the results."""
    lines = ["## Scaling", "",
             "tr_jax runs the train step over a `(\"data\", \"task\")` device mesh "
             "(`tr_jax.sharding`): batches split over `data`, the batched task heads and the "
             "routing masks split over `task`, and the TAG affinity's source tasks split over "
             "`task` (`tr_jax.affinity.sharded`: each device computes the per-task gradients "
             "and lookahead forwards of its block of rows of Z, chunked, and Z is gathered "
             "once). Multi-host runs start with `tr_jax.sharding.initialize_distributed()`; "
             "each process feeds its own rows of every batch.", "",
             "Measured on 2 shared CPU cores (each part's machine and date are under its "
             "heading), with *fake* CPU devices "
             "(`jax_num_cpu_devices`) that all share those cores: more devices cannot be "
             "faster here; the tables show that the sharded steps run and what partitioning "
             "costs. Model: routed VGG-11 (width 1/8, BN) on 8x8x1 inputs, per-example "
             "routing, every task in every batch; affinity = TAG lookahead with per-example "
             f"task losses, chunks of {CHUNK} source tasks per device. Medians of "
             f"{results['reps']} interleaved repeats.", ""]
    if "devices" in results:
        lines += ["### Step time vs devices (T = 40, batch 64)", "", *_measured(results, "devices"),
                  "| devices | train step, mesh (n, 1) [s] | train + affinity, mesh (1, n) [s] |",
                  "|---:|---:|---:|"]
        by_n: dict[int, list] = {}
        for row in results["devices"]:
            by_n.setdefault(row["devices"], []).append(row["results"])
        for n, runs in sorted(by_n.items()):
            med = [sorted(r[i]["step_s"] for r in runs)[len(runs) // 2] for i in (0, 1)]
            lines.append(f"| {n} | {med[0]:.3f} | {med[1]:.2f} |")
        lines.append("")
    if "tasks" in results:
        lines += ["### Step time and memory vs tasks (1 device)", "", *_measured(results, "tasks"),
                  "| T | batch | train step [s] | train + affinity [s] | affinity / train | "
                  "peak MiB (train) | peak MiB (train + affinity) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        rows = results["tasks"][0]["results"]
        for t in TASK_COUNTS:
            plain = next(r for r in rows if r["T"] == t and not r["affinity"])
            aff = next(r for r in rows if r["T"] == t and r["affinity"])
            lines.append(f"| {t} | {plain['batch_size']} | {plain['step_s']:.3f} | "
                         f"{aff['step_s']:.2f} | {aff['step_s'] / plain['step_s']:.0f}x | "
                         f"{_mib(plain['memory']['peak'])} | {_mib(aff['memory']['peak'])} |")
        lines.append("")
    if "memory" in results:
        lines += ["### Memory at T = 312 (per device, planned by XLA; batch 312)", "",
                  *_measured(results, "memory"),
                  "| devices (task axis) | step | lookahead | peak MiB | temporaries MiB | "
                  "compile [s] |", "|---:|---|---|---:|---:|---:|"]
        lines += _memory_rows(results["memory"]) + [""]
    if "memory_full" in results:
        lines += ["### Memory of the full-size step (compile only)", "",
                  *_measured(results, "memory_full"),
                  "Routed VGG-11 (width 1, BN), 64x64x3 inputs, batch 624, T = 312 "
                  "(the `vgg312_scale.py` accelerator config), per device as XLA:CPU plans it.",
                  "", "| devices (task axis) | step | lookahead | peak MiB | temporaries MiB | "
                  "compile [s] |", "|---:|---|---|---:|---:|---:|"]
        lines += _memory_rows(results["memory_full"]) + [""]
    if "precision" in results:
        lines += ["### Mixed precision (digits quickstart, 12 epochs)", "",
                  *_measured(results, "precision"),
                  "`model_kwargs.dtype` set to bfloat16 in code: bfloat16 activations and "
                  "matmuls, float32 "
                  "parameters, optimizer state and losses.", "",
                  "| compute dtype | test mean accuracy | balanced | wall [s] |",
                  "|---|---:|---:|---:|"]
        for r in results["precision"]:
            lines.append(f"| {r['dtype']} | {r['mean_accuracy']:.4f} | "
                         f"{r['mean_balanced_accuracy']:.4f} | {r['wall_s']} |")
        lines.append("")
    if "scale" in results:
        s = results["scale"]
        lines += ["### 312 tasks end to end", "", *_measured(results, "scale"),
                  "`python benchmarks/scaling.py --scale experiments/configs/vgg312_scale.py:"
                  "runlocal`: routed VGG-11 (width 1/8) on the offline digits with 312 "
                  "*fabricated* tasks (task k = digit in a random subset S_k of 0-9), "
                  f"per-example routing, batch {s['batch_size']} (one example per task), "
                  f"{s['steps']} steps, the 312x312 lookahead affinity measured on "
                  f"{s['affinity_steps']} of them inside the jitted train step.", "",
                  "| quantity | value |", "|---|---|",
                  f"| mesh | {s['mesh']} on {s['devices']} device(s) |",
                  f"| compile (train step with affinity) | {s['compile_s']} s |",
                  f"| step with affinity | {s['affinity_step_s']} s |",
                  f"| step without affinity | {s['plain_step_s']} s |",
                  f"| planned peak per device | "
                  f"{_mib(s['compiled_memory_per_device']['peak'])} MiB |",
                  f"| process peak RSS | {_mib(s['max_rss'])} MiB |",
                  f"| affinity matrix | {s['affinity_shape']}, all finite: "
                  f"{s['affinity_finite']}, mean diagonal {s['affinity_mean_diag']:.3f}, "
                  f"mean off-diagonal {s['affinity_mean_offdiag']:.3f} |",
                  f"| Spearman(Z[i, j], label correlation of i and j) | "
                  f"{s['affinity_vs_label_correlation']:.3f} |",
                  f"| test mean accuracy / balanced | {s['mean_accuracy']:.3f} / "
                  f"{s['mean_balanced_accuracy']:.3f} |", ""]
    lines += ["### Reading the numbers", "",
              "- Fake devices time-share 2 cores, so step times cannot fall with more devices; "
              "the repeats of one setting vary up to 2x on this shared machine. What the "
              "tables do show: every mesh runs the same program (the tests check the results "
              "equal the single-device ones), and the partitioning overhead of the small "
              "data-parallel step.",
              "- A TAG step at T tasks costs one forward, T backward and T lookahead forwards: "
              "about T times a train step (1 forward + 1 backward, backward ~ 2 forwards). "
              "The measured affinity / train ratio at T = 312 is in the tasks table.",
              "- Per device, chunking bounds memory by the chunk (a chunk of c source tasks "
              "holds c gradients and c lookahead forwards of the batch); the task axis divides "
              "the *time* (T / n rows per device). Unchunked, the task axis also divides the "
              "memory." + _full_size_memory(results),
              "- The 312-task run shows the path at scale, not a TAG finding: with one example "
              "per task per batch and 5 measured steps, the per-example Z is dominated by its "
              "diagonal and its off-diagonal entries do not track how related the fabricated "
              "tasks are. Per-example affinity needs several examples per task in each batch "
              "(batch = k T) and many measured steps; `affinity_mode=\"all_tasks\"` measures "
              "every task on every example at T times the cost for routed models."]
    if "precision" in results:
        by_dtype = {r["dtype"]: r for r in results["precision"]}
        f32, bf16 = by_dtype["float32"], by_dtype["bfloat16"]
        lines.append(
            "- bfloat16 compute (float32 parameters) trains the digits quickstart to test mean "
            f"accuracy {bf16['mean_accuracy']:.4f} against float32's "
            f"{f32['mean_accuracy']:.4f}, in {bf16['wall_s']} s against {f32['wall_s']} s "
            "(one run each, one after the other, compilation included: a load change "
            "between the two runs shows up in full).")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="devices,tasks,memory,precision,scale")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the devices part")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--scale", help="run this scale config (path[:variant]) and exit")
    parser.add_argument("--workdir", default="runs/vgg312_local")
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: real)")
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.precision:
        _start_jax(None)
        print("RESULT " + json.dumps(run_precision(args.precision)))
        return
    if args.scale:
        _start_jax(args.devices)
        out = run_scale(load_config(args.scale, overrides), args.workdir)
        print("RESULT " + json.dumps(out))
        return
    parts = args.parts.split(",")
    from tr_jax import cpu_runtime
    machine = f"{cpu_runtime.describe_machine()} (shared, loaded)"
    results: dict[str, Any] = {"reps": args.reps, "measured": {}}
    for part in parts:
        print(f"part {part}", flush=True)
        t0 = time.perf_counter()
        if part == "devices":
            results["devices"] = part_devices(args.reps, args.rounds)
        elif part == "tasks":
            results["tasks"] = part_tasks(args.reps)
        elif part == "memory":
            results["memory"] = part_memory()
        elif part == "memory_full":
            results["memory_full"] = part_memory_full()
        elif part == "precision":
            results["precision"] = part_precision()
        elif part == "scale":
            results["scale"] = scale_subprocess(
                "experiments/configs/vgg312_scale.py:runlocal", args.workdir, args.devices)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"part {part}: {time.perf_counter() - t0:.0f} s", flush=True)
        results["measured"][part] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine}
        RESULTS.mkdir(parents=True, exist_ok=True)
        old = json.loads((RESULTS / "scaling.json").read_text()) if (
            RESULTS / "scaling.json").exists() else {}
        merged = {**old, **results, "measured": {**old.get("measured", {}), **results["measured"]}}
        (RESULTS / "scaling.json").write_text(json.dumps(merged, indent=1))
        (RESULTS / "scaling.md").write_text(markdown(merged))
    print(markdown(json.loads((RESULTS / "scaling.json").read_text())))


if __name__ == "__main__":
    main()

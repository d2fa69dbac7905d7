"""Affinity estimators against the exact TAG lookahead: accuracy over training runs, cost vs T.

Run from the repository root::

    .venv/bin/python benchmarks/affinity_estimators.py            # full (about an hour on 2 cores)
    .venv/bin/python benchmarks/affinity_estimators.py --quick    # smoke test, a few minutes

Writes ``benchmarks/results/affinity_estimators.json`` (every number) and ``.md`` (tables).

Accuracy. One SGD training run per task set (all tasks on every example, summed loss). At
every step, on the same parameters and batch, the exact lookahead
(:func:`tr_jax.affinity.lookahead_affinity`, SGD lookahead at the training lr) and each
estimator are computed; their run-averaged matrices are compared with the exact one: Spearman
rank correlation and sign agreement of the off-diagonal entries, the per-step Spearman (median
over steps), the groups :func:`tr_jax.grouping.select_groups` picks for 2, 3 and 4 networks
(same groups as from the exact matrix? and the exact matrix's objective at the estimator's
groups relative to its own optimum: the ``regret``). Gradient cosine similarity (CS) is listed
as a baseline. Task sets: planted groups (:func:`tr_jax.data.synthetic.load_synthetic`, an MLP)
at T = 9 and T = 312, and the digits attribute tasks (T = 18, SmallCNN).

Cost. Seconds per affinity computation (jitted, median of interleaved repeats, compile time
apart) on the TAG CelebA encoder (RoutedResNet, unrouted, width 64) for T in {9, 40, 100, 312},
at a reduced input size to fit a 2-core CPU (see ``--image-size`` / ``--batch-size``), next to
a plain train step (forward + backward of the summed loss).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from rounds import rotated  # noqa: E402
from tr_jax import affinity, cpu_runtime, grouping  # noqa: E402
from tr_jax.data import load_digits  # noqa: E402
from tr_jax.data.synthetic import load_synthetic  # noqa: E402
from tr_jax.losses import per_task_losses  # noqa: E402
from tr_jax.models import MLP, RoutedResNet, SmallCNN, apply_all_tasks  # noqa: E402

cpu_runtime.configure()   # as the tr-jax command line does

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NUM_GROUPS = (2, 3, 4)


# ----------------------------------------------------------------------------- shared pieces


def make_loss_fn(model, others: dict) -> Callable:
    """``loss_fn(shared, rest, batch) -> (T,)``, BatchNorm on batch statistics (discarded)."""
    def loss_fn(shared, rest, batch):
        variables = {**others, "params": affinity.merge_params(shared, rest)}
        logits, _ = apply_all_tasks(model, variables, batch["image"], train=True)
        return per_task_losses(logits, batch["labels"], batch.get("label_mask"))
    return loss_fn


def estimator_fns(model, lr: float, ks: tuple[int, ...], *, exact: bool = True,
                  extras: bool = True) -> dict[str, Callable]:
    """name -> fn(variables, batch, key) -> (T, T) for the exact lookahead and the estimators."""
    def split(variables, shared=("encoder",)):
        others = {k: v for k, v in variables.items() if k != "params"}
        shared, rest = affinity.split_params(variables["params"], shared)
        return make_loss_fn(model, others), shared, rest

    def lookahead(variables, batch, key):
        loss_fn, shared, rest = split(variables)
        return affinity.lookahead_affinity(loss_fn, shared, rest, batch, lr=lr)

    def taylor(variables, batch, key, order=1, last_layer=False):
        loss_fn, shared, rest = split(
            variables, [last_layer_path(variables["params"])] if last_layer else ("encoder",))
        return affinity.taylor_affinity(loss_fn, shared, rest, batch, lr=lr, order=order)

    def sketch(variables, batch, key, k):
        loss_fn, shared, rest = split(variables)
        return affinity.sketched_affinity(loss_fn, shared, rest, batch, lr=lr, key=key,
                                          num_directions=k)

    def representation(variables, batch, key):
        return affinity.model_representation_affinity(model, variables, batch, lr=lr)

    def cosine(variables, batch, key):
        loss_fn, shared, rest = split(variables)
        return affinity.gradient_cosine(loss_fn, shared, rest, batch)

    fns = {"exact": lookahead} if exact else {}
    fns["taylor"] = taylor
    fns["taylor_last"] = functools.partial(taylor, last_layer=True)
    if extras:
        fns["taylor2"] = functools.partial(taylor, order=2)
    fns.update({f"sketch{k}": functools.partial(sketch, k=k) for k in ks})
    fns["representation"] = representation
    if extras:
        fns["cosine"] = cosine
    return fns


def last_layer_path(params: dict) -> tuple[str, ...]:
    """Key path of the encoder's last layer in key order (a module holding arrays, or one made
    of such modules, like conv + BatchNorm): ``taylor_last`` is the Gram restricted to it."""
    def is_module(node) -> bool:
        return all(not isinstance(v, dict) for v in node.values())

    path, node = ("encoder",), params["encoder"]
    while True:
        key = sorted(node)[-1]
        path, node = path + (key,), node[key]
        if is_module(node) or all(isinstance(v, dict) and is_module(v) for v in node.values()):
            return path


def off_diagonal(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(len(m), dtype=bool)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(scipy.stats.spearmanr(off_diagonal(a), off_diagonal(b)).statistic)


# ----------------------------------------------------------------------------- accuracy


def training_run(name: str, dataset, model, *, steps: int, lr: float, batch_size: int,
                 ks: tuple[int, ...], seed: int = 0, extras: bool = True) -> dict[str, Any]:
    """SGD on the summed task losses; every step, every estimator on the same state/batch."""
    x0 = dataset.splits["train"]["image"][:1]
    variables = model.init({"params": jax.random.key(seed)}, x0, 0)
    fns = estimator_fns(model, lr, ks, extras=extras)

    @jax.jit
    def step(variables, batch, key):
        keys = jax.random.split(key, len(fns))
        out = {n: f(variables, batch, k) for (n, f), k in zip(fns.items(), keys)}

        def total(params):
            logits, stats = apply_all_tasks(model, {**variables, "params": params},
                                            batch["image"], train=True)
            return per_task_losses(logits, batch["labels"], batch["label_mask"]).sum(), stats

        (loss, stats), grads = jax.value_and_grad(total, has_aux=True)(variables["params"])
        new = {**variables, "params": jax.tree.map(lambda p, g: p - lr * g,
                                                   variables["params"], grads)}
        if stats is not None:
            new["batch_stats"] = stats
        return new, out, loss

    sums = {n: 0.0 for n in fns}
    halves = [0.0, 0.0]  # exact over even / odd steps: how reproducible the target itself is
    per_step = {n: [] for n in fns if n != "exact"}
    losses = []
    t0 = time.perf_counter()
    epoch, batches = 0, iter(())
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = dataset.batches("train", batch_size, epoch=epoch, seed=seed)
            epoch += 1
            batch = next(batches)
        batch = {k: batch[k] for k in ("image", "labels", "label_mask")}
        variables, out, loss = step(variables, batch, jax.random.key(1000 + i))
        out = {n: np.asarray(v, np.float64) for n, v in out.items()}
        losses.append(float(loss))
        halves[i % 2] = halves[i % 2] + out["exact"]
        for n, v in out.items():
            sums[n] = sums[n] + v
            if n != "exact":
                per_step[n].append(spearman(v, out["exact"]))
    seconds = time.perf_counter() - t0
    means = {n: v / steps for n, v in sums.items()}
    exact = means["exact"]
    chosen = {n: {g: grouping.select_groups(m, g, method="auto", time_limit=20.0)
                  for g in NUM_GROUPS} for n, m in means.items()}
    rows = {}
    for n, m in means.items():
        if n == "exact":
            continue
        row = {"spearman": spearman(m, exact),
               "pearson": float(np.corrcoef(off_diagonal(m), off_diagonal(exact))[0, 1]),
               "sign_agreement": float(np.mean(np.sign(off_diagonal(m))
                                               == np.sign(off_diagonal(exact)))),
               "per_step_spearman_median": float(np.median(per_step[n])),
               "same_groups": {}, "regret": {}}
        for g in NUM_GROUPS:
            ours, ref = chosen[n][g], chosen["exact"][g]
            row["same_groups"][g] = set(ours.groups) == set(ref.groups)
            # exact matrix's objective at the estimator's groups, relative to the exact pick
            at_ours = grouping.score_groups(exact, ours.groups)
            row["regret"][g] = float((ref.score - at_ours) / abs(ref.score))
        rows[n] = row
    planted = dataset.groups
    return {"name": name, "num_tasks": dataset.num_tasks, "model": type(model).__name__,
            "steps": steps, "lr": lr, "batch_size": batch_size,
            "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
            "seconds": seconds, "estimators": rows,
            "exact_split_half": {"spearman": spearman(*halves), "pearson": float(np.corrcoef(
                off_diagonal(halves[0]), off_diagonal(halves[1]))[0, 1])},
            "exact_groups": {g: [list(t) for t in chosen["exact"][g].groups]
                             for g in NUM_GROUPS},
            "exact_groups_optimal": {g: bool(chosen["exact"][g].optimal) for g in NUM_GROUPS},
            "planted_groups": [list(t) for t in planted] if planted else None,
            "matrices": ({n: m.tolist() for n, m in means.items()}
                         if dataset.num_tasks <= 20 else None)}


# ----------------------------------------------------------------------------- cost


def time_calls(fns: dict[str, Callable], args: tuple, repeats: int,
               budget_s: float) -> dict[str, dict[str, float]]:
    """Compile each fn, then time them interleaved; a fn slower than ``budget_s`` per call
    gets fewer repeats (at least one)."""
    out, compiled = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        t1 = time.perf_counter()
        jax.block_until_ready(compiled[name](*args))  # first run (allocation)
        out[name] = {"compile_s": t1 - t0, "first_s": time.perf_counter() - t1, "runs": []}
    for r in range(repeats):
        for name, fn in rotated(list(compiled.items()), r):
            if r and out[name]["first_s"] * r > budget_s:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]["runs"].append(time.perf_counter() - t0)
    for v in out.values():
        v["median_s"] = statistics.median(v["runs"])
    return out


def cost_one(t: int, ks: tuple[int, ...], *, image_size: int, batch_size: int, width: int,
             repeats: int, budget_s: float) -> dict[str, Any]:
    """Timings of every estimator and a plain train step at T = ``t`` (in this process)."""
    model = RoutedResNet(num_tasks=t, width=width)
    rng = np.random.default_rng(t)
    batch = {"image": jnp.asarray(rng.random((batch_size, image_size, image_size, 3)),
                                  jnp.float32),
             "labels": jnp.asarray(rng.integers(0, 2, (batch_size, t)), jnp.int32),
             "label_mask": jnp.ones((batch_size, t), bool)}
    variables = model.init({"params": jax.random.key(0)}, batch["image"][:1], 0)

    def train_step(variables, batch, key):
        def total(params):
            logits, _ = apply_all_tasks(model, {**variables, "params": params},
                                        batch["image"], train=True)
            return per_task_losses(logits, batch["labels"], batch["label_mask"]).sum()
        return jax.grad(total)(variables["params"])

    fns = {"train_step": train_step, **estimator_fns(model, 5e-4, ks, extras=False)}
    timing = time_calls(fns, (variables, batch, jax.random.key(0)), repeats, budget_s)
    return {"num_tasks": t, "timing": timing,
            "ratio_to_exact": {n: timing["exact"]["median_s"] / v["median_s"]
                               for n, v in timing.items()},
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def cost_sweep(tasks: tuple[int, ...], ks: tuple[int, ...], *, image_size: int, batch_size: int,
               width: int, repeats: int, budget_s: float) -> list[dict[str, Any]]:
    """:func:`cost_one` for every T, each in a fresh process (no memory or cache carried)."""
    records = []
    for t in tasks:
        cmd = [sys.executable, __file__, "--cost-one", str(t), "--image-size", str(image_size),
               "--batch-size", str(batch_size), "--width", str(width), "--repeats",
               str(repeats), "--budget", str(budget_s), "--cost-ks", *map(str, ks)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"T={t}: " + ", ".join(f"{n} {v['median_s']:.3f}s"
                                     for n, v in rec["timing"].items()), flush=True)
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- report


def fmt_groups(groups) -> str:
    return " ".join("(" + ",".join(map(str, g)) + ")" for g in groups)


def measured_line(part: dict[str, Any]) -> str:
    """The line that says which run measured one part of the results: machine, date, command."""
    return f"Measured on {part['machine']}, {part['date']}: `{part['command']}`."


def write_markdown(result: dict[str, Any], path: pathlib.Path) -> None:
    """Writes the tables of ``result`` as read back from the JSON file (string dict keys)."""
    accuracy, cost = result["accuracy"], result["cost"]
    cfg = cost["config"]
    lines = ["# Affinity estimators vs the exact TAG lookahead", "",
             "## Accuracy of the run-averaged matrix", "", measured_line(accuracy), "",
             "Spearman / Pearson / sign agreement: off-diagonal entries of the run-averaged matrix vs the "
             "exact one. Per-step: median over steps of the single-step Spearman. Groups: "
             "`select_groups` for 2 / 3 / 4 networks, `=` same groups as from the exact matrix; "
             "regret: loss of the exact matrix's objective at the estimator's groups, relative "
             "to the exact pick (0 = as good).", ""]
    for run in accuracy["runs"]:
        lines += [f"### {run['name']} (T = {run['num_tasks']}, {run['model']}, "
                  f"{run['steps']} steps, lr {run['lr']}, batch {run['batch_size']}; loss "
                  f"{run['first_loss']:.3g} -> {run['last_loss']:.3g}; {run['seconds']:.0f} s)",
                  "",
                  "| estimator | Spearman | Pearson | sign agr. | per-step Spearman "
                  "| same groups 2/3/4 | regret 2/3/4 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for n, r in run["estimators"].items():
            same = "/".join("=" if r["same_groups"][str(g)] else "x" for g in NUM_GROUPS)
            regret = " / ".join(f"{r['regret'][str(g)]:.3f}" for g in NUM_GROUPS)
            lines.append(f"| {n} | {r['spearman']:.3f} | {r['pearson']:.3f} | "
                         f"{r['sign_agreement']:.3f} | "
                         f"{r['per_step_spearman_median']:.3f} | {same} | {regret} |")
        half = run["exact_split_half"]
        lines += ["", f"Noise ceiling: the exact matrix averaged over the even steps vs over the "
                      f"odd steps has Spearman {half['spearman']:.3f}, Pearson "
                      f"{half['pearson']:.3f}.", "",
                  "Exact groups: " + "; ".join(
            f"{g}: {fmt_groups(run['exact_groups'][str(g)])}"
            f"{'' if run['exact_groups_optimal'][str(g)] else ' (not proven optimal)'}"
            for g in NUM_GROUPS)]
        if run["planted_groups"] and len(run["planted_groups"]) <= 6:
            lines.append(f"Planted groups: {fmt_groups(run['planted_groups'])}")
        lines.append("")
    lines += ["## Cost per affinity computation", "", measured_line(cost), "",
              f"RoutedResNet (TAG CelebA encoder, unrouted, width {cfg['width']}), "
              f"{cfg['image_size']}x{cfg['image_size']}x3 inputs, batch {cfg['batch_size']}, "
              "float32, jitted; median seconds over interleaved repeats (compile excluded). "
              "`train_step`: forward + backward of the summed loss, for scale. "
              "x: speed-up over the exact lookahead.", ""]
    names = list(cost["rows"][0]["timing"])
    lines += ["| T | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for rec in cost["rows"]:
        cells = [f"{rec['timing'][n]['median_s']:.3f} s ({rec['ratio_to_exact'][n]:.1f}x)"
                 for n in names]
        lines.append(f"| {rec['num_tasks']} | " + " | ".join(cells) + " |")
    lines += ["", "Compile seconds: " + "; ".join(
        f"T={rec['num_tasks']}: " + ", ".join(f"{n} {v['compile_s']:.0f}"
                                              for n, v in rec["timing"].items())
        for rec in cost["rows"]), "",
        "Peak resident memory of the timing process: " + ", ".join(
            f"T={rec['num_tasks']}: {rec['peak_rss_gb']:.1f} GB" for rec in cost["rows"]), ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-test sweep")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tasks", type=int, nargs="+", default=[9, 40, 100, 312])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="sketch directions per step in the accuracy runs")
    parser.add_argument("--cost-ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="stop repeating a timed call after this many seconds")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "affinity_estimators"))
    parser.add_argument("--cost-one", type=int, help=argparse.SUPPRESS)  # one T, JSON to stdout
    args = parser.parse_args(argv)
    if args.cost_one:
        print(json.dumps(cost_one(args.cost_one, tuple(args.cost_ks), image_size=args.image_size,
                                  batch_size=args.batch_size, width=args.width,
                                  repeats=args.repeats, budget_s=args.budget)))
        return
    steps = 30 if args.quick else 300
    ks = tuple(args.ks)
    tasks = tuple(args.tasks[:2] if args.quick else args.tasks)
    accuracy = []
    if not args.skip_accuracy:
        runs = [
            ("planted 3x3", load_synthetic(3, 3, seed=0), MLP(num_tasks=9, hidden=(64, 64)),
             dict(lr=0.1, batch_size=64)),
            ("digits", load_digits(), SmallCNN(num_tasks=18, widths=(16, 32)),
             dict(lr=0.05, batch_size=64)),
            ("planted 26x12", load_synthetic(26, 12, dim=64, num_train=4096, seed=1),
             MLP(num_tasks=312, hidden=(128, 128)), dict(lr=0.1, batch_size=64)),
        ]
        for name, data, model, kw in runs[:2] if args.quick else runs:
            run = training_run(name, data, model, steps=steps, ks=ks, **kw,
                               extras=data.num_tasks <= 40)
            print(json.dumps({k: run[k] for k in ("name", "num_tasks", "seconds")}),
                  {n: round(r["spearman"], 3) for n, r in run["estimators"].items()},
                  flush=True)
            accuracy.append(run)
    cost = [] if args.skip_cost else cost_sweep(
        tasks, tuple(args.cost_ks), image_size=args.image_size, batch_size=args.batch_size,
        width=args.width, repeats=2 if args.quick else args.repeats, budget_s=args.budget)
    header = {"machine": f"{platform.node()}: {cpu_runtime.describe_machine()}, "
                         f"jax {jax.__version__} on {jax.default_backend()}, "
                         f"{jax.local_device_count()} device(s)",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["benchmarks/affinity_estimators.py", *(argv or sys.argv[1:])]),
              "config": vars(args)}
    result = {}
    if accuracy:
        result["accuracy"] = {**header, "runs": accuracy}
    if cost:
        result["cost"] = {**header, "rows": cost}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.with_suffix(".json").exists():  # a part skipped this time keeps its own run's header
        old = json.loads(out.with_suffix(".json").read_text())
        result = {part: result.get(part, old.get(part)) for part in ("accuracy", "cost")}
    text = json.dumps(result, indent=1)
    out.with_suffix(".json").write_text(text)
    if result.get("cost") and result.get("accuracy"):
        write_markdown(json.loads(text), out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

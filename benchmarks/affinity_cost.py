"""Cost of the TAG lookahead affinity inside the train step, against a plain step and a loop.

Run from the repository root::

    .venv/bin/python benchmarks/affinity_cost.py              # quick: T = 2, 9 (a few minutes)
    .venv/bin/python benchmarks/affinity_cost.py --full       # T = 2, 9, 40, 100, 312 (hours)
    .venv/bin/python benchmarks/affinity_cost.py --tasks 40 --methods auto,loop

Writes ``benchmarks/results/affinity_cost.json`` (every number; cases already in the file for
other T are kept) and ``.md`` (the table).

Model: the TAG CelebA encoder (:class:`tr_jax.models.RoutedResNet`, unrouted, width 64) with
one batched 2-way head per task, 64x64 inputs, batch 64, float32, SGD lr 5e-4 momentum 0.9.

- ``plain``: loss (sum of per-task mean softmax cross-entropies), gradient, SGD-momentum
  update and BatchNorm statistics, one jit.
- ``auto`` / ``unrolled`` / ``vmap`` / ``chunked``: the plain step plus
  :func:`tr_jax.affinity.lookahead_affinity` with the optimizer's own lookahead
  (:func:`tr_jax.affinity.optax_lookahead`, as the official CelebA code) in ONE jit, by
  strategy (``chunked`` uses ``--chunk-size``).
- ``fused``: as ``auto``, but the update reuses the per-task gradients (their sum is the
  summed loss's gradient of the encoder, :func:`tr_jax.affinity.per_task_and_total_grads`):
  one forward, T backward passes and T lookahead forwards in all, no separate plain step.
- ``loop``: what a framework without a traced task loop does: a Python loop over jitted
  per-task pieces (task i's forward + backward, its lookahead forward), then the plain step.

Every case runs in its own subprocess (peak memory = its ``ru_maxrss``, compile included),
where the case and the plain step are timed interleaved (plain, case, plain, case, ...), so
each ratio is measured side by side in one process; medians are reported. FLOPs are XLA's
cost analysis of the compiled step (for ``loop``: the sum of its pieces, times T where
repeated; XLA counts a loop body once, so the forwards a ``jax.lax.map`` loop repeats are
added back). Target (issue 4): TAG step / plain step <= 0.5 (1 + T) at T = 9 and 40; never
slower than the loop; T = 312 within 24 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
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
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tr_jax import cpu_runtime  # noqa: E402
from tr_jax.affinity import (lookahead_affinity, merge_params, optax_lookahead,  # noqa: E402
                             per_task_and_total_grads, split_params)
from tr_jax.affinity.strategy import resolve_strategy  # noqa: E402
from tr_jax.models import RoutedResNet  # noqa: E402

cpu_runtime.configure()   # as the tr-jax command line does (and in every case subprocess)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LR, MOMENTUM = 5e-4, 0.9
METHODS = ("auto", "fused", "unrolled", "vmap", "chunked", "loop")
QUICK_TASKS, FULL_TASKS = (2, 9), (2, 9, 40, 100, 312)
VMAP_MAX_TASKS = 9   # full vmap at T=40 needs ~35 GB (anchors/README.md)


# ----------------------------------------------------------------------------- one case


def ce_per_task(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, T, 2) logits, (B, T) labels -> (T,) mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(0)


def build(num_tasks: int, batch_size: int, image_size: int):
    """Model, initial train state pieces, a batch, the losses and the plain step."""
    model = RoutedResNet(num_tasks=num_tasks)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = {"image": jax.random.normal(kx, (batch_size, image_size, image_size, 3)),
             "labels": jax.random.randint(ky, (batch_size, num_tasks), 0, 2)}
    variables = model.init(kp, batch["image"][:2], None)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(LR, momentum=MOMENTUM)

    def losses_and_stats(params, stats, batch):
        logits, updates = model.apply({"params": params, "batch_stats": stats}, batch["image"],
                                      None, True, mutable=["batch_stats"])
        return ce_per_task(logits, batch["labels"]), updates["batch_stats"]

    def affinity_loss(shared, rest, batch):     # BN on batch statistics, updates discarded
        return losses_and_stats(merge_params(shared, rest["params"]), rest["stats"], batch)[0]

    def plain_step(params, opt_state, stats, batch):
        def total(p):
            losses, new_stats = losses_and_stats(p, stats, batch)
            return losses.sum(), new_stats
        (loss, new_stats), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_stats, loss

    def fused_step(params, opt_state, stats, batch, strategy="auto", chunk_size=None):
        shared, rest = split_params(params)
        losses, grads, rest_grad, new_stats = per_task_and_total_grads(
            lambda s, r, b: losses_and_stats(merge_params(s, r), stats, b), shared, rest,
            batch, has_aux=True, strategy=strategy, chunk_size=chunk_size)
        z = lookahead_affinity(affinity_loss, shared, {"params": rest, "stats": stats}, batch,
                               lr=LR, update_fn=optax_lookahead(tx, opt_state, shared, rest),
                               strategy=strategy, chunk_size=chunk_size,
                               losses_and_grads=(losses, grads))
        full = merge_params(jax.tree.map(lambda g: g.sum(0), grads), rest_grad)
        updates, opt_state = tx.update(full, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_stats, losses.sum(), z

    state = (params, tx.init(params), stats)
    return tx, state, batch, affinity_loss, plain_step, fused_step


def tag_step_fn(tx, affinity_loss, plain_step, strategy: str, chunk_size: int | None):
    """The plain step plus the (T, T) lookahead affinity, to be jitted as one function."""
    def tag_step(params, opt_state, stats, batch):
        shared, rest = split_params(params)
        z = lookahead_affinity(affinity_loss, shared, {"params": rest, "stats": stats}, batch,
                               lr=LR, update_fn=optax_lookahead(tx, opt_state, shared, rest),
                               strategy=strategy, chunk_size=chunk_size)
        return (*plain_step(params, opt_state, stats, batch), z)
    return tag_step


def flops_of(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def loop_flops_missing(resolved: tuple[str, int | None], num_tasks: int, tx, state, batch,
                       affinity_loss) -> float:
    """FLOPs of the lookahead forwards that XLA's cost analysis leaves out: it counts a
    while loop's body once, so a ``jax.lax.map`` over T // c chunks misses (T // c - 1) * c
    forwards (each one ``affinity_loss``)."""
    strategy, chunk = resolved
    if strategy != "chunked":
        return 0.0
    chunk = chunk or num_tasks
    params, _, stats = state
    shared, rest = split_params(params)
    forward, _ = compile_timed(affinity_loss, shared, {"params": rest, "stats": stats}, batch)
    return (num_tasks // chunk - 1) * chunk * flops_of(forward)


def compile_timed(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def loop_runner(tx, affinity_loss, plain_step, state, batch):
    """A Python loop over jitted per-task pieces; returns (run(state) -> Z, compile s, FLOPs)."""
    params, opt_state, stats = state
    shared, rest = split_params(params)
    rest = {"params": rest, "stats": stats}
    num_tasks = batch["labels"].shape[1]

    def task_grad(shared, rest, batch, i):
        return jax.grad(lambda s: affinity_loss(s, rest, batch)[i])(shared)

    def lookahead(shared, rest, batch, opt_state, g):
        delta = optax_lookahead(tx, opt_state, shared, rest["params"])(g)
        return affinity_loss(jax.tree.map(jnp.subtract, shared, delta), rest, batch)

    i0 = jnp.int32(0)
    g0 = jax.tree.map(jnp.zeros_like, shared)
    pieces = {"losses": compile_timed(affinity_loss, shared, rest, batch),
              "grad": compile_timed(task_grad, shared, rest, batch, i0),
              "lookahead": compile_timed(lookahead, shared, rest, batch, opt_state, g0),
              "plain": compile_timed(plain_step, params, opt_state, stats, batch)}
    f = {k: flops_of(c) for k, (c, _) in pieces.items()}
    flops = (f["losses"] + num_tasks * (f["grad"] + f["lookahead"]) + f["plain"]
             if None not in f.values() else None)
    fns = {k: c for k, (c, _) in pieces.items()}

    def run(state):
        params, opt_state, stats = state
        shared, rest_p = split_params(params)
        rest = {"params": rest_p, "stats": stats}
        before = fns["losses"](shared, rest, batch)
        rows = []
        for i in range(num_tasks):
            g = fns["grad"](shared, rest, batch, jnp.int32(i))
            rows.append(fns["lookahead"](shared, rest, batch, opt_state, g))
        z = (1.0 - jnp.stack(rows) / before[None]) / LR
        out = fns["plain"](params, opt_state, stats, batch)
        return (*out, z)

    return run, sum(t for _, t in pieces.values()), flops


def run_case(num_tasks: int, method: str, steps: int, warmup: int, batch_size: int,
             image_size: int, chunk_size: int | None) -> dict:
    """Times ``method`` and the plain step interleaved in this process."""
    tx, state, batch, affinity_loss, plain_step, fused_step = build(num_tasks, batch_size,
                                                                    image_size)
    plain, plain_compile = compile_timed(plain_step, *state, batch)
    row = {"T": num_tasks, "method": method, "batch": batch_size, "hw": image_size,
           "plain_compile_s": plain_compile, "plain_flops": flops_of(plain)}
    if method == "plain":
        run, row["compile_s"], row["flops"] = plain, plain_compile, row["plain_flops"]
    elif method == "loop":
        run_loop, row["compile_s"], row["flops"] = loop_runner(tx, affinity_loss, plain_step,
                                                               state, batch)
        run = lambda *a: run_loop(a[:3])  # noqa: E731
    else:
        chunk = chunk_size if method == "chunked" else None
        strategy = "auto" if method == "fused" else method
        row["resolved"] = {"forward": resolve_strategy(strategy, num_tasks, chunk),
                           "backward": resolve_strategy(strategy, num_tasks, chunk,
                                                        backward=True)}
        step = (fused_step if method == "fused"
                else tag_step_fn(tx, affinity_loss, plain_step, strategy, chunk))
        compiled, row["compile_s"] = compile_timed(step, *state, batch)
        row["flops"] = flops_of(compiled) + loop_flops_missing(
            row["resolved"]["forward"], num_tasks, tx, state, batch, affinity_loss)
        run = compiled
    timings = {"plain": [], "case": []}
    for k in range(warmup + steps):
        for name, fn in (("plain", plain), ("case", run)):
            if method == "plain" and name == "case":
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*state, batch))
            if k >= warmup:
                timings[name].append((time.perf_counter() - t0) * 1e3)
    row["plain_ms"] = timings["plain"]
    row["ms"] = timings["case"] or timings["plain"]
    row["ratio"] = statistics.median(row["ms"]) / statistics.median(row["plain_ms"])
    row["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return row


# ----------------------------------------------------------------------------- driver


def methods_for(num_tasks: int, requested: list[str]) -> list[str]:
    out = []
    for m in requested:
        if m == "vmap" and num_tasks > VMAP_MAX_TASKS:
            continue             # memory: ~35 GB at T = 40
        if m in ("unrolled", "chunked") and num_tasks > 100:
            continue             # compile time grows with T; "auto" covers large T
        out.append(m)
    return out


def spawn(args, num_tasks: int, method: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{num_tasks}:{method}", "--steps", str(steps),
           "--warmup", str(warmup), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--chunk-size", str(args.chunk_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                     "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"T": num_tasks, "method": method, "error": proc.stderr[-2000:],
                "returncode": proc.returncode, "wall_s": wall}
    row = json.loads(lines[-1])
    row["wall_s"] = wall
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (T, method): medians over all timed steps of all rounds."""
    table, measured = {}, {}
    for r in rows:
        key = (r["T"], r["method"])
        measured.setdefault(r["T"], set()).add(r["measured"])
        if "error" in r:
            table.setdefault(key, {"T": r["T"], "method": r["method"], "error": r["error"]})
            continue
        t = table.setdefault(key, {"T": r["T"], "method": r["method"], "ms": [],
                                   "plain_ms": [], "ratios": [], "maxrss_gb": 0.0})
        t["ms"] += r["ms"]
        t["plain_ms"] += r["plain_ms"]
        t["ratios"].append(r["ratio"])
        t["maxrss_gb"] = max(t["maxrss_gb"], r["maxrss_gb"])
        for k in ("flops", "plain_flops", "compile_s", "resolved"):
            if k in r:
                t[k] = r[k]
    pooled = {}      # every plain sample at each T, over all of that T's processes
    for t in table.values():
        pooled.setdefault(t["T"], []).extend(t.get("plain_ms", []))
    for t in table.values():
        t["measured"] = sorted(measured[t["T"]])
        if "ms" in t:
            t["ms_median"] = statistics.median(t["ms"])
            t["plain_ms_median"] = statistics.median(t["plain_ms"])
            t["ratio_median"] = statistics.median(t["ratios"])
            t["pooled_plain_ms"] = statistics.median(pooled[t["T"]])
            t["pooled_plain_n"] = len(pooled[t["T"]])
    return sorted(table.values(), key=lambda t: (t["T"], METHODS.index(t["method"])
                                                 if t["method"] in METHODS else -1))


def markdown(summary: list[dict], info: dict) -> str:
    lines = [
        "# TAG affinity cost (benchmarks/affinity_cost.py)", "",
        f"{info['machine']}; jax {info['jax']}; RoutedResNet (TAG CelebA encoder), "
        f"{info['hw']}x{info['hw']}, batch {info['batch']}, float32, SGD momentum; optimizer "
        "lookahead every step. Each (T, method) ran in its own process; `ratio` = median "
        "step time / median plain step time measured interleaved in that process (median "
        "over rounds). At T >= 40 each process times one step of each (after one untimed "
        "step at T = 40; above 40 the timed step is the first execution, first-touch page "
        "faults included), so a busy machine moves that ratio a lot: `pooled` divides by the "
        "median of every plain sample at "
        "that T (n in the header row of each T) and the FLOP ratio (XLA's cost analysis) does "
        "not depend on load. Target: ratio <= 0.5 (1 + T) at T = 9, 40.", "",
        "Measured (the header's machine line is the last run's): " + "; ".join(
            f"T = {t}: {', '.join(dates)}" for t, dates in
            {t["T"]: t["measured"] for t in summary}.items()) + ".", "",
        "| T | method | step ms | plain ms | ratio | pooled | 0.5(1+T) | GFLOP step "
        "| GFLOP plain | FLOP ratio | compile s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in summary:
        if "error" in t:
            lines.append(f"| {t['T']} | {t['method']} | failed: "
                         f"{t['error'].strip().splitlines()[-1][:80] if t['error'] else '?'} "
                         "| | | | | | | | | |")
            continue
        fl, pf = t.get("flops"), t.get("plain_flops")
        flop_ratio = f"{fl / pf:.1f}" if fl and pf else ""
        pooled = (f"{t['pooled_plain_n']} plain" if t["method"] == "plain"
                  else f"{t['ms_median'] / t['pooled_plain_ms']:.2f}")
        lines.append(
            f"| {t['T']} | {t['method']} | {t['ms_median']:.0f} | {t['plain_ms_median']:.0f} "
            f"| {t['ratio_median']:.2f} | {pooled} | {0.5 * (1 + t['T']):.1f} "
            f"| {fl / 1e9 if fl else float('nan'):.1f} | {pf / 1e9 if pf else float('nan'):.1f} "
            f"| {flop_ratio} | {t.get('compile_s', float('nan')):.0f} | {t['maxrss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help=f"T = {FULL_TASKS}")
    ap.add_argument("--tasks", default=None, help="comma-separated T values")
    ap.add_argument("--methods", default="plain," + ",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=1, help="subprocess rounds for T <= 9")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round (T <= 9)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=3)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "affinity_cost"))
    args = ap.parse_args(argv)
    if args.case:
        t, method = args.case.split(":")
        print(json.dumps(run_case(int(t), method, args.steps, args.warmup, args.batch_size,
                                  args.image_size, args.chunk_size)), flush=True)
        return
    tasks = ([int(t) for t in args.tasks.split(",")] if args.tasks
             else FULL_TASKS if args.full else QUICK_TASKS)
    requested = args.methods.split(",")
    out = pathlib.Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(
        ".json").exists() else {"rows": []}
    # Rows of other T values are kept, each with the date of the run that measured it.
    rows = [{"measured": old["info"]["date"], **r} for r in old["rows"] if r["T"] not in tasks]
    date = time.strftime("%Y-%m-%d %H:%M")
    for num_tasks in tasks:
        small = num_tasks <= 9
        steps, warmup = (args.steps, args.warmup) if small else (1, 1 if num_tasks <= 40 else 0)
        for _ in range(args.rounds if small else 1):
            for method in methods_for(num_tasks, requested):   # interleaved across methods
                row = spawn(args, num_tasks, method, steps, warmup)
                rows.append({**row, "measured": date})
                print(json.dumps({k: row.get(k) for k in ("T", "method", "ratio", "ms",
                                                          "plain_ms", "compile_s",
                                                          "maxrss_gb", "error")})[:400],
                      flush=True)
    info = {"machine": f"{cpu_runtime.describe_machine()} (shared)",
            "jax": jax.__version__, "python": platform.python_version(),
            "hw": args.image_size, "batch": args.batch_size,
            "date": date, "load_avg": os.getloadavg()}
    summary = summarize(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"info": info, "summary": summary, "rows": rows}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(summary, info))
    print(markdown(summary, info))


if __name__ == "__main__":
    main()

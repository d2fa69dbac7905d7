"""What routing costs: routed VGG-11-BN train step vs the same network without routing, and
per-example routing over 312 tasks vs a one-task step. Ratios measured side by side in one run
(interleaved rounds, medians), written to benchmarks/results/routing_overhead.{json,md}.

  python benchmarks/routing_overhead.py [--hw 32] [--batch 32] [--rounds 7]

Targets (issue 3): routed / unrouted <= 1.05; per-example T=312 / one task <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_cases  # noqa: E402  (puts the repository on sys.path)
from tr_jax import cpu_runtime  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_case(num_tasks: int, sharing: float | None, per_example: bool, hw: int, batch: int):
    """Compiles one case (:func:`jax_cases.tr_train`); returns a zero-argument callable running
    one blocking step."""
    run = jax_cases.tr_train(hw, num_tasks, per_example, sharing=sharing, batch_size=batch)
    run()  # compile
    run()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    cases = {"unrouted (T=40)": (40, None, False), "routed σ=0.5 (T=40)": (40, 0.5, False),
             "one task of 312": (312, 0.5, False), "per-example ids, T=312": (312, 0.5, True)}
    runs = {name: make_case(*spec, a.hw, a.batch) for name, spec in cases.items()}
    times = {name: [] for name in cases}
    for _ in range(a.rounds):  # interleaved, so load changes hit every case alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {"routed / unrouted": med["routed σ=0.5 (T=40)"] / med["unrouted (T=40)"],
              "per-example T=312 / one task": med["per-example ids, T=312"]
              / med["one task of 312"]}
    info = {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
            "machine": cpu_runtime.describe_machine(), "load_avg": os.getloadavg(),
            "hw": a.hw, "batch": a.batch, "rounds": a.rounds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_overhead.json").write_text(json.dumps(
        {"info": info, "ms": times, "median_ms": med, "ratios": ratios}, indent=1))
    lines = [f"## Routing overhead: VGG-11-BN train step, {a.hw}x{a.hw}, batch {a.batch} "
             f"({info['backend']}, {info['cpus']} cores, load {info['load_avg'][0]:.1f})", "",
             "| case | median ms | all rounds (ms) |", "|---|---|---|"]
    lines += [f"| {n} | {med[n]:.0f} | {' '.join(f'{t:.0f}' for t in times[n])} |"
              for n in cases]
    lines += ["", "| ratio | measured | target |", "|---|---|---|",
              f"| routed / unrouted | {ratios['routed / unrouted']:.3f} | <= 1.05 |",
              f"| per-example T=312 / one task | "
              f"{ratios['per-example T=312 / one task']:.3f} | <= 1.2 |"]
    (RESULTS / "routing_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""What routing costs: routed VGG-11-BN train step vs the same network without routing, and
per-example routing over 312 tasks vs a one-task step. Ratios measured side by side in one run
(interleaved rounds in rotating order; each ratio is the median over rounds of the two cases'
medians in that round), written to benchmarks/results/routing_overhead.{json,md}.

  python benchmarks/routing_overhead.py [--hw 32] [--batch 32] [--rounds 9] [--steps 3]

Targets (issue 3): routed / unrouted <= 1.05; per-example T=312 / one task <= 1.2.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_cases  # noqa: E402  (puts the repository on sys.path)
import results_io  # noqa: E402
from rounds import rotated  # noqa: E402

CASES = {"unrouted (T=40)": (40, None, False), "routed σ=0.5 (T=40)": (40, 0.5, False),
         "one task of 312": (312, 0.5, False), "per-example ids, T=312": (312, 0.5, True)}
# ratio name: (numerator case, denominator case, target)
RATIOS = {"routed / unrouted": ("routed σ=0.5 (T=40)", "unrouted (T=40)", 1.05),
          "per-example T=312 / one task": ("per-example ids, T=312", "one task of 312", 1.2)}


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
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case and round")
    ap.add_argument("--out", default=str(results_io.RESULTS / "routing_overhead"),
                    help="path without suffix")
    a = ap.parse_args()
    runs = {name: make_case(*spec, a.hw, a.batch) for name, spec in CASES.items()}
    info = {**results_io.machine_info(os.getloadavg()), "hw": a.hw, "batch": a.batch,
            "rounds": a.rounds, "steps": a.steps}
    # rounds[r][case]: that case's median step (ms) in round r
    rounds: list[dict[str, float]] = []
    for r in range(a.rounds):  # interleaved, so load changes hit every case alike
        ms = {}
        for name, run in rotated(list(runs.items()), r):
            steps = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                run()
                steps.append((time.perf_counter() - t0) * 1e3)
            ms[name] = statistics.median(steps)
        rounds.append(ms)
    med = {name: statistics.median(ms[name] for ms in rounds) for name in CASES}
    per_round = {ratio: [ms[num] / ms[den] for ms in rounds]
                 for ratio, (num, den, _) in RATIOS.items()}
    ratios = {ratio: statistics.median(values) for ratio, values in per_round.items()}
    lines = [f"## Routing overhead: VGG-11-BN train step, {a.hw}x{a.hw}, batch {a.batch}", "",
             f"{info['machine']}; jax {info['jax']}; {a.rounds} interleaved rounds of "
             f"{a.steps} steps per case ({info['date']}, load average at the start "
             f"{info['load_avg'][0]:.1f}). ms: median over rounds of each round's median "
             "step; ratio: median over rounds of the ratio within the round.", "",
             "| case | median ms | per round (ms) |", "|---|---|---|"]
    lines += [f"| {n} | {med[n]:.0f} | {' '.join(f'{ms[n]:.0f}' for ms in rounds)} |"
              for n in CASES]
    lines += ["", "| ratio | measured | per round | target |", "|---|---|---|---|"]
    lines += [f"| {ratio} | {ratios[ratio]:.3f} | "
              f"{' '.join(f'{v:.2f}' for v in per_round[ratio])} | <= {target} |"
              for ratio, (_, _, target) in RATIOS.items()]
    results_io.write_results("routing_overhead", a.out, {
        "info": info, "round_ms": rounds, "median_ms": med, "per_round_ratios": per_round,
        "ratios": ratios}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

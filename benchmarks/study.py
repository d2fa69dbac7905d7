"""A task-grouping study config, committed as results, plus TAG's cost against HOA's measured
side by side.

1. Runs ``experiments/configs/NAME.py`` (default ``study_digits``: exactly what
   ``python -m tr_jax`` runs) and writes ``benchmarks/results/NAME.{json,md,png}`` (and
   ``NAME_affinity_tag.png``).
2. The study times each method once, at different moments of a shared, noisy machine. Here the
   two choosing procedures are timed interleaved, ``--rounds`` times (order alternating): one
   TAG run (all tasks, lookahead affinity every step) and the T + T (T - 1) / 2 single-task and
   pairwise HOA runs (training and validation), with wall and CPU seconds; the medians and the
   median per-round ratio go into the same JSON and Markdown.

  python benchmarks/study.py [--config study_digits] [--rounds 5] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rounds import rotated  # noqa: E402
from tr_jax import cli, cpu_runtime  # noqa: E402
from tr_jax.experiment import build_dataset  # noqa: E402
from tr_jax.study import (GroupTrainer, format_study_table, hoa_task_sets,  # noqa: E402
                          hold_out_validation, run_study)


def interleaved_cost(config, rounds: int) -> dict:
    """Wall and CPU seconds of TAG's one run and HOA's runs, interleaved ``rounds`` times."""
    dataset = hold_out_validation(build_dataset(config), config.validation_fraction,
                                  config.seed)
    trainer = GroupTrainer(config, dataset)
    everything = tuple(range(dataset.num_tasks))
    trainer.fit(everything, config.seed, "lookahead")  # compile both steps before timing
    trainer.fit(everything, config.seed)
    samples = {"tag": [], "hoa": []}
    for r in range(rounds):
        for method in rotated(("tag", "hoa"), r):
            nets = ([trainer.fit(everything, r, "lookahead")] if method == "tag" else
                    [trainer.fit(tasks, r) for tasks in hoa_task_sets(dataset.num_tasks)])
            samples[method].append((sum(n.seconds for n in nets),
                                    sum(n.cpu_seconds for n in nets)))
    tag, hoa = np.array(samples["tag"]), np.array(samples["hoa"])
    return {"rounds": rounds, "hoa_runs": len(hoa_task_sets(dataset.num_tasks)),
            "tag_seconds": tag[:, 0].tolist(), "tag_cpu_seconds": tag[:, 1].tolist(),
            "hoa_seconds": hoa[:, 0].tolist(), "hoa_cpu_seconds": hoa[:, 1].tolist(),
            "median_ratio_seconds": float(np.median(hoa[:, 0] / tag[:, 0])),
            "median_ratio_cpu_seconds": float(np.median(hoa[:, 1] / tag[:, 1])),
            "load_average": os.getloadavg()}


def cost_markdown(cost: dict) -> str:
    rows = [f"| {m} | " + " | ".join(f"{np.median(cost[f'{m.lower()}_{k}']):.2f}"
                                      for k in ("seconds", "cpu_seconds")) + " |"
            for m in ("TAG", "HOA")]
    return "\n".join([
        f"### TAG vs HOA, timed interleaved ({cost['rounds']} rounds, medians)", "",
        "| method | wall s | CPU s |", "|---|---|---|", *rows, "",
        f"HOA ({cost['hoa_runs']} runs) / TAG (1 run): median per-round ratio "
        f"{cost['median_ratio_seconds']:.1f}x in wall seconds, "
        f"{cost['median_ratio_cpu_seconds']:.1f}x in CPU seconds (load average "
        f"{cost['load_average'][0]:.1f} at the end)."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="study_digits", help="a config in experiments/configs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    cpu_runtime.configure()   # before any computation, as the tr-jax command line does
    name, out = args.config, Path(args.out)
    config = cli.load_config(str(cli.STUDY_CONFIG.with_name(f"{name}.py")), [])
    with tempfile.TemporaryDirectory() as workdir:
        results = run_study(config, workdir)
        shutil.copy(Path(workdir) / "study.png", out / f"{name}.png")
        shutil.copy(Path(workdir) / "affinity_tag.png", out / f"{name}_affinity_tag.png")
    results["interleaved_cost"] = cost = interleaved_cost(config, args.rounds)
    with open(out / f"{name}.json", "w") as f:
        json.dump(results, f, indent=1)
    t = len(results["task_names"])
    text = "\n\n".join([
        f"## Task-grouping study `{name}`: {t} {config.dataset} tasks "
        f"(`python -m tr_jax study --config experiments/configs/{name}.py`)",
        format_study_table(results), cost_markdown(cost),
        f"![total error per method]({name}.png) ![TAG affinity]({name}_affinity_tag.png)"])
    (out / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

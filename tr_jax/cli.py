"""``tr-jax`` / ``python -m tr_jax``: the command-line entry points.

  tr-jax                                   quickstart: the task-grouping study on offline digits
  tr-jax train --config CONFIG.py[:ARG] [--config.field=value ...] [--workdir DIR] [--resume]
  tr-jax study --config CONFIG.py [--config.field=value ...] [--workdir DIR]
  tr-jax affinity --config CONFIG.py [--method lookahead|taylor|...] [--workdir DIR] [--resume]
  tr-jax bench NAME [ARGS ...]              run benchmarks/NAME.py (source checkout) with ARGS;
                                           `bench peers` is benchmarks/vs_peers.py
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

import numpy as np
from absl import flags
from ml_collections import config_flags

from tr_jax import cpu_runtime

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "digits.py"
STUDY_CONFIG = REPO / "experiments" / "configs" / "study_digits.py"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped by SIGTERM after saving a checkpoint
BENCH_ALIASES = {"peers": "vs_peers"}  # `tr-jax bench peers` runs benchmarks/vs_peers.py


def load_config(path: str, overrides: list[str]):
    """Loads ``get_config()`` (``get_config(ARG)`` for ``path:ARG``) from ``path`` and applies
    ``--config.a.b=value`` overrides."""
    if not Path(path.split(":", 1)[0]).is_file():
        raise SystemExit(f"config file {path} does not exist; configs live in "
                         f"{REPO / 'experiments' / 'configs'}.")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise SystemExit(f"unknown arguments {bad}; override config fields as --config.name=value.")
    argv = ["tr-jax"] + overrides
    fv = flags.FlagValues()
    # sys_argv: else config_flags reads sys.argv, where "--config PATH" makes it return None.
    config_flags.DEFINE_config_file("config", path, "experiment config", flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def _train(args, overrides) -> None:
    from tr_jax.checkpoint import Preempted
    from tr_jax.experiment import format_accuracy_table, train_and_evaluate

    config = load_config(args.config, overrides)
    try:
        result = train_and_evaluate(config, args.workdir, resume=args.resume)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    print(format_accuracy_table(result))
    print(f"results and metrics written to {os.path.abspath(args.workdir)}")


def _affinity(args, overrides) -> None:
    from tr_jax.experiment import train_and_evaluate

    config = load_config(args.config, overrides)
    method = args.method or config.get("affinity") or "lookahead"
    with config.unlocked():
        config.affinity = method
    result = train_and_evaluate(config, args.workdir, resume=args.resume)
    if "affinity" not in result:
        raise SystemExit("no affinity was measured: the run had no training step with "
                         "affinity (check --config.affinity_every and the number of steps).")
    print(format_affinity(np.asarray(result["affinity"]), tuple(result["task_names"]), method))
    print(f"affinity.npy, affinity.json and affinity.png written to "
          f"{os.path.abspath(args.workdir)}")


def format_affinity(matrix: np.ndarray, task_names: tuple[str, ...], method: str,
                    top: int = 5) -> str:
    """A short text summary of a (T, T) run-averaged affinity (source i, target j): the
    ``top`` most helpful and most harmful source -> target pairs (pairs never measured, NaN,
    are counted but not ranked)."""
    off = [(float(matrix[i, j]), i, j) for i in range(len(task_names))
           for j in range(len(task_names)) if i != j]
    unmeasured = sum(not np.isfinite(z) for z, _, _ in off)
    off = sorted(p for p in off if np.isfinite(p[0]))
    lines = [f"mean {method} affinity over the run, {len(task_names)} tasks "
             "(Z[i, j] > 0: a step on task i lowers task j's loss)"]
    if unmeasured:
        lines.append(f"  {unmeasured} pairs never measured (a task without labelled examples)")
    for title, pairs in (("most helpful", off[::-1][:top]), ("most harmful", off[:top])):
        lines.append(f"  {title}:")
        lines += [f"    {task_names[i]} -> {task_names[j]}: {z:+.4g}" for z, i, j in pairs]
    return "\n".join(lines)


def _runnable(script: Path) -> bool:
    """A benchmark script (it has a ``__main__`` block), not a module benchmarks import."""
    return 'if __name__ == "__main__":' in script.read_text()


def _bench(args, rest) -> None:
    script = BENCHMARKS / f"{BENCH_ALIASES.get(args.name, args.name)}.py"
    available = sorted(p.stem for p in BENCHMARKS.glob("*.py") if _runnable(p))
    available += [f"{alias} (= {name})" for alias, name in sorted(BENCH_ALIASES.items())
                  if name in available]
    if not script.is_file() or not _runnable(script):
        listed = ", ".join(available) or ("none (benchmarks/ ships with the source checkout: "
                                          "git clone the repository)")
        raise SystemExit(f"no benchmark {args.name!r} in {BENCHMARKS}; available: {listed}.")
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")


def _study(args, overrides) -> None:
    from tr_jax.study import format_study_table, run_study

    results = run_study(load_config(args.config, overrides), args.workdir)
    print(format_study_table(results))
    print(f"study.json, study.md and study.png written to {os.path.abspath(args.workdir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tr-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="train a config and evaluate every task")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (get_config())")
    p.add_argument("--workdir", default="runs/train", help="where metrics and results go")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in WORKDIR/checkpoints (needs "
                        "config.checkpoint_every_steps > 0)")
    p.set_defaults(func=_train)
    p = sub.add_parser("study", help="choose task groups with TAG, CS and HOA, train, compare")
    p.add_argument("--config", default=str(STUDY_CONFIG), help="config file (get_config())")
    p.add_argument("--workdir", default="runs/study", help="where the study results go")
    p.set_defaults(func=_study)
    p = sub.add_parser("affinity", help="train with the affinity on; write the mean matrix "
                                        "(.npy, .json with task names) and a heatmap (.png)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (get_config())")
    p.add_argument("--method", choices=("lookahead", "cosine", "taylor", "sketch",
                                             "representation"),
                   help="affinity estimator (default: the config's, else lookahead)")
    p.add_argument("--workdir", default="runs/affinity", help="where the matrix goes")
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR/checkpoints")
    p.set_defaults(func=_affinity)
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (e.g. peers = vs_peers, "
                                     "affinity_cost, affinity_estimators); extra arguments go "
                                     "to it (NAME --help lists them)")
    p.add_argument("name", help="benchmark name: benchmarks/NAME.py; aliases: "
                                + ", ".join(f"{a} = {n}" for a, n in BENCH_ALIASES.items()))
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``tr-jax`` and ``python -m tr_jax``."""
    cpu_runtime.configure()   # before any computation: see tr_jax.cpu_runtime
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["study", "--workdir", "runs/quickstart"]
    if argv[0] == "bench":      # everything after NAME belongs to the benchmark
        args = parser.parse_args(argv[:2])
        args.func(args, argv[2:])
        return
    args, overrides = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    from tr_jax.sharding import initialize_distributed

    initialize_distributed()   # multi-host when JAX_COORDINATOR_ADDRESS etc. are set
    args.func(args, overrides)

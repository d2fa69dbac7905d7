"""``tr-jax`` / ``python -m tr_jax``: the command-line entry points.

  tr-jax                                   quickstart: the task-grouping study on offline digits
  tr-jax train --config CONFIG.py[:ARG] [--config.field=value ...] [--workdir DIR] [--resume]
  tr-jax study --config CONFIG.py [--config.field=value ...] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "digits.py"
STUDY_CONFIG = REPO / "experiments" / "configs" / "study_digits.py"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped by SIGTERM after saving a checkpoint


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
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``tr-jax`` and ``python -m tr_jax``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["study", "--workdir", "runs/quickstart"]
    args, overrides = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    args.func(args, overrides)

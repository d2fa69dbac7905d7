"""tr_jax against the PyTorch and TF2 peers, side by side on one machine.

Run from the repository root (the peers' virtual environments come from
``bash ../shared/anchors/setup_envs.sh``, about 1.5 min)::

    .venv/bin/tr-jax bench peers                  # = tr-jax bench vs_peers; 3 rounds, about 25 min on 2 cores
    .venv/bin/python benchmarks/vs_peers.py --rounds 1 --rows tr_train_32,tag_plain_9

The peers are the official-style implementations in ``../shared/anchors`` (``tr_torch.py``:
Task Routing VGG-11-BN in PyTorch; ``tag_tf.py``: the TAG CelebA step in TensorFlow 2), run
unchanged in their own environments. The tr_jax cases (``jax_cases.py``) are the same networks,
batches and optimizers through ``tr_jax.train.make_train_step``. Each round runs the torch
script, the tr_jax routing cases, the TF script and the tr_jax TAG cases, one after the other
(the order flips every round); every case is the median of its timed steps in that round and
each row's ratio (tr_jax / peer) is the median over rounds of the per-round ratios. Like the
peers, whose two scripts are two processes, tr_jax runs each group (the routing rows, the TAG
rows) in its own worker process: once a 64x64 VGG case had run in a process, its TAG plain
step stayed 20-30 % slower (perf_notes.md section 13). A worker compiles its cases once,
before the first round (compile times are reported apart), and times them when asked.

Writes ``benchmarks/results/vs_peers_<ISA>.json`` (every timing) and ``.md`` (the table), one
pair per vector ISA (``avx2``, ``avx512``): the peers' kernels and ours differ by ISA.
Target: tr_jax / peer <= 1.0 on every row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax_cases  # noqa: E402  (puts the repository on sys.path)
import results_io  # noqa: E402
from rounds import rotated  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ANCHORS = REPO.parent / "shared" / "anchors"
PEER_ENVS = pathlib.Path.home() / ".cache" / "anchors"
# tag_tf.py's calls before timing its T = 40 cases, the tracing one included (its default, 1,
# timed the first call after tracing); tr_jax's cases are compiled and run once beforehand.
PEER_WARMUP_T40 = 2


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a tr_jax case and the peer row it is measured against."""
    key: str
    label: str
    framework: str                    # "torch" or "tf": which peer script measures it
    peer: dict                        # fields that select the peer script's result row
    build: Callable[[], Callable[[], None]]   # compiles the tr_jax case; returns one step
    slow: bool = False                # TAG T=40: --slow-steps timed steps on both sides


def _tr_rows(hw: int) -> tuple[Row, ...]:
    """The routed VGG-11-BN rows at ``hw`` x ``hw`` (torch peer)."""
    train = {"hw": hw, "what": "train_step"}
    return (
        Row(f"tr_train_{hw}", f"TR VGG-11-BN train, {hw}x{hw}, one task (T=40)", "torch",
            {**train, "variant": "single_task"},
            lambda: jax_cases.tr_train(hw, 40, per_example=False)),
        Row(f"tr_per_example_{hw}", f"TR per-example task ids, T=312, {hw}x{hw}", "torch",
            {**train, "variant": "per_example"},
            lambda: jax_cases.tr_train(hw, 312, per_example=True)),
        Row(f"tr_eval_{hw}", f"TR eval forward, {hw}x{hw}", "torch",
            {"hw": hw, "what": "eval_forward"}, lambda: jax_cases.tr_eval(hw)))


def _tag_row(num_tasks: int, what: str) -> Row:
    """A TAG CelebA-encoder row (TF peer): ``what`` = ``"plain_step"`` or ``"tag_step"``."""
    plain = what == "plain_step"
    label = "TAG plain step" if plain else "TAG step (lookahead affinity)"
    return Row(f"tag_{'plain' if plain else 'step'}_{num_tasks}", f"{label}, T={num_tasks}", "tf",
               {"T": num_tasks, "what": what}, lambda: jax_cases.tag(num_tasks, what),
               slow=num_tasks > 9)  # tag_tf.py times both of its T = 40 cases that way


ROWS = (*_tr_rows(32), *_tr_rows(64), _tag_row(9, "plain_step"), _tag_row(40, "plain_step"),
        _tag_row(9, "tag_step"), _tag_row(40, "tag_step"))


def peer_command(framework: str, rows: list[Row], args, out: str) -> list[str]:
    """The command line that runs one peer script for ``rows`` (its own venv)."""
    if framework == "torch":
        sizes = sorted({r.peer["hw"] for r in rows})
        cmd = [args.torch_python, str(args.anchors / "tr_torch.py"), "--steps", str(args.steps),
               "--sizes", ",".join(map(str, sizes))]
        if not any(r.peer.get("variant") == "per_example" for r in rows):
            cmd.append("--no-per-example")
        return cmd + ["--out", out]
    tasks = sorted({r.peer["T"] for r in rows})
    return [args.tf_python, str(args.anchors / "tag_tf.py"), "--tasks",
            ",".join(map(str, tasks)), "--steps", str(args.steps), "--steps-t40",
            str(args.slow_steps), "--warmup-t40", str(PEER_WARMUP_T40), "--out", out]


def run_peer(framework: str, rows: list[Row], args) -> dict[str, float]:
    """Runs the peer script once; returns {row key: median ms}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{framework}.json")
        proc = subprocess.run(peer_command(framework, rows, args, out), cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the {framework} peer failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        peer_rows = json.loads(pathlib.Path(out).read_text())["rows"]
    found = {}
    for row in rows:
        match = [p for p in peer_rows if all(p.get(k) == v for k, v in row.peer.items())]
        if len(match) != 1:
            raise RuntimeError(f"{row.key}: expected one {framework} result matching "
                               f"{row.peer}, found {len(match)}.")
        found[row.key] = match[0]["ms_median"]
    return found


def time_jax(step: Callable[[], None], steps: int) -> float:
    """Median ms of ``steps`` calls (each blocks until its result is ready)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


REPLY = "@vs_peers "   # prefixes a worker's replies on its stdout; anything else is passed on


def serve(keys: list[str]) -> None:
    """The worker: compiles the rows ``keys``, replies ``{key: compile s}``, then answers each
    stdin line ``KEY STEPS`` with the median ms of ``STEPS`` timed steps, until stdin closes."""
    steps, compile_s = {}, {}
    for row in (r for r in ROWS if r.key in keys):
        start = time.perf_counter()
        steps[row.key] = row.build()
        steps[row.key]()                              # first call: compile + run
        compile_s[row.key] = time.perf_counter() - start
        print(f"tr_jax {row.key}: compiled and ran once in {compile_s[row.key]:.1f} s",
              file=sys.stderr, flush=True)
    print(REPLY + json.dumps(compile_s), flush=True)
    for line in sys.stdin:
        key, n = line.split()
        print(REPLY + json.dumps(time_jax(steps[key], int(n))), flush=True)


class Worker:
    """A ``vs_peers.py --worker`` process holding one group's compiled tr_jax cases."""

    def __init__(self, rows: list[Row]):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", ",".join(r.key for r in rows)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.compile_s: dict[str, float] = self._reply()

    def _reply(self):
        """The worker's next reply (other stdout lines are printed through)."""
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
            print(line, end="")
        raise RuntimeError(f"the tr_jax worker exited with status {self.proc.wait()} (its "
                           "error is printed above).")

    def time(self, row: Row, steps: int) -> float:
        """Median ms of ``steps`` timed steps of ``row``, run in the worker."""
        self.proc.stdin.write(f"{row.key} {steps}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        """Ends the worker (stdin closed) and waits for it."""
        self.proc.stdin.close()
        self.proc.wait()


def check_peers(args, frameworks: set[str]) -> None:
    """Clear errors when a peer script or its environment is missing."""
    for framework in frameworks:
        python = args.torch_python if framework == "torch" else args.tf_python
        script = args.anchors / ("tr_torch.py" if framework == "torch" else "tag_tf.py")
        if not script.is_file():
            raise SystemExit(f"peer script {script} not found; pass --anchors DIR (the "
                             "shared/anchors directory next to the repository).")
        if not pathlib.Path(python).is_file():
            raise SystemExit(f"no {framework} environment at {python}; create it with "
                             f"`bash {args.anchors}/setup_envs.sh` or pass --{framework}-python.")


def markdown(summary: list[dict], info: dict) -> str:
    lines = ["# tr_jax vs the PyTorch / TF2 peers (benchmarks/vs_peers.py)", "",
             f"{info['machine']}; jax {info['jax']}; {info['rounds']} interleaved rounds "
             f"({info['date']}, load average at the start {info['load_avg'][0]:.1f}). "
             "ms = median over rounds of each round's median step; ratio = median over "
             "rounds of tr_jax / peer measured in the same round. Target: ratio <= 1.0.", "",
             "| case | peer | peer ms | tr_jax ms | tr_jax / peer | per round "
             "| tr_jax compile + 1st step s |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        rounds = " ".join(f"{m / p:.2f}" for m, p in zip(s["jax_ms_rounds"], s["peer_ms_rounds"]))
        lines.append(f"| {s['label']} | {s['framework']} | {s['peer_ms']:.0f} | "
                     f"{s['jax_ms']:.0f} | {s['ratio']:.2f} | {rounds} | {s['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    ap.add_argument("--slow-steps", type=int, default=2, help="timed steps for TAG T=40")
    ap.add_argument("--rows", default="all",
                    help=f"comma-separated keys of {[r.key for r in ROWS]}")
    ap.add_argument("--anchors", type=pathlib.Path, default=ANCHORS)
    ap.add_argument("--torch-python", default=str(PEER_ENVS / "torch" / "bin" / "python"))
    ap.add_argument("--tf-python", default=str(PEER_ENVS / "tf" / "bin" / "python"))
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default: benchmarks/results/"
                         "vs_peers_<ISA>, e.g. vs_peers_avx2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)   # ROWS keys; see serve()
    args = ap.parse_args(argv)
    if args.worker:
        return serve(args.worker.split(","))
    keys = [r.key for r in ROWS] if args.rows == "all" else args.rows.split(",")
    unknown = set(keys) - {r.key for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {[r.key for r in ROWS]}.")
    rows = [r for r in ROWS if r.key in keys]
    groups = {f: [r for r in rows if r.framework == f] for f in ("torch", "tf")}
    groups = {f: g for f, g in groups.items() if g}
    check_peers(args, set(groups))

    workers = {f: Worker(group) for f, group in groups.items()}   # compiles the cases
    compile_s = {k: v for w in workers.values() for k, v in w.compile_s.items()}

    load_avg = os.getloadavg()
    per_round = []
    for rnd in range(args.rounds):
        timings = {"peer": {}, "jax": {}}
        for framework, group in groups.items():
            for side in rotated(("peer", "jax"), rnd):
                if side == "peer":
                    timings["peer"].update(run_peer(framework, group, args))
                else:
                    for row in group:
                        n = args.slow_steps if row.slow else args.steps
                        timings["jax"][row.key] = workers[framework].time(row, n)
            for row in group:
                print(f"round {rnd + 1} {row.key}: {framework} "
                      f"{timings['peer'][row.key]:.0f} ms, tr_jax {timings['jax'][row.key]:.0f} "
                      f"ms, ratio {timings['jax'][row.key] / timings['peer'][row.key]:.2f}",
                      flush=True)
        per_round.append(timings)
    for worker in workers.values():
        worker.close()

    summary = []
    for row in rows:
        peer = [t["peer"][row.key] for t in per_round]
        mine = [t["jax"][row.key] for t in per_round]
        summary.append({"key": row.key, "label": row.label, "framework": row.framework,
                        "peer_ms": statistics.median(peer), "jax_ms": statistics.median(mine),
                        "ratio": statistics.median(m / p for m, p in zip(mine, peer)),
                        "compile_s": compile_s[row.key], "peer_ms_rounds": peer,
                        "jax_ms_rounds": mine})
    info = {**results_io.machine_info(load_avg), "rounds": args.rounds, "steps": args.steps,
            "slow_steps": args.slow_steps, "peer_warmup_t40": PEER_WARMUP_T40}
    # A run of some rows goes to vs_peers_partial_<ISA> unless --out says otherwise: it must
    # not replace the full table.
    results_io.write_results("vs_peers" if args.rows == "all" else "vs_peers_partial", args.out,
                             {"info": info, "summary": summary}, markdown(summary, info))


if __name__ == "__main__":
    main()

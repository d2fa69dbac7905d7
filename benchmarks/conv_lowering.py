"""Which convolution lowering is fastest for each 3x3 layer of the benchmarked networks.

``tr_jax.nn.conv2d(lowering="auto")`` picks ``"im2col"``, ``"winograd"`` or ``"xla"`` by the
output map's size and the input channels (``WINOGRAD_MIN_SIDE``, ``WINOGRAD_MAX_AREA``,
``WINOGRAD_MIN_CIN``, ``IM2COL_MAX_AREA`` in ``tr_jax/nn/conv.py``), and ``"winograd"`` picks
its tile by the map (``tr_jax.nn.winograd.default_tile``). The best thresholds depend on the
CPU's vector ISA (the peers' and XLA's kernels differ between AVX2 and AVX-512), so this times
every lowering, Winograd with either tile, on every layer shape of routed VGG-11-BN (32x32 and
64x64 input, batch 32) and of the TAG encoder (64x64 input, batch 64), first layers (3 input
channels) included: value and both gradients of ``sum(conv(x, k) ** 2)`` under one
``jax.jit``, interleaved across lowerings, median of ``--reps`` rounds. The table says which
lowering ``"auto"`` picks and how far it is from the fastest; a row far above 1.0 means a
threshold should move on that ISA.

Usage:
  python benchmarks/conv_lowering.py [--reps 7] [--out benchmarks/results/conv_lowering_<isa>]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_io  # noqa: E402
from rounds import rotated  # noqa: E402
from tr_jax import cpu_runtime  # noqa: E402
from tr_jax.nn import conv, winograd  # noqa: E402
# Winograd is timed with each tile: "winograd2" is F(2x2, 3x3), "winograd4" F(4x4, 3x3).
LOWERINGS = ("xla", "im2col", "winograd2", "winograd4")
# (batch, map side, Cin, Cout) of every distinct 3x3 layer; the network(s) it occurs in.
LAYERS = (
    (32, 32, 3, 64, "VGG 32"), (32, 64, 3, 64, "VGG 64"), (64, 64, 3, 64, "TAG"),
    (32, 2, 512, 512, "VGG 32"), (32, 4, 256, 512, "VGG 32"), (32, 4, 512, 512, "VGG 32, 64"),
    (32, 8, 128, 256, "VGG 32"), (32, 8, 256, 256, "VGG 32"), (32, 8, 256, 512, "VGG 64"),
    (32, 8, 512, 512, "VGG 64"), (32, 16, 64, 128, "VGG 32"), (32, 16, 128, 256, "VGG 64"),
    (32, 16, 256, 256, "VGG 64"), (32, 32, 64, 128, "VGG 64"), (64, 32, 64, 64, "TAG"),
)


def value_and_grads(batch: int, hw: int, cin: int, cout: int,
                    lowering: str) -> Callable[[], None]:
    """Compiles value and (x, kernel) gradients of one layer; returns a blocking call."""
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * (9 * cin) ** -0.5
    if lowering.startswith("winograd"):
        layer = functools.partial(winograd.winograd_conv, pads=((1, 1), (1, 1)),
                                  tile=int(lowering[-1]))
    else:
        layer = functools.partial(conv.conv2d, lowering=lowering)
    fn = jax.jit(jax.value_and_grad(lambda x, k: (layer(x, k) ** 2).sum(), argnums=(0, 1)))
    jax.block_until_ready(fn(x, kernel))
    return lambda: jax.block_until_ready(fn(x, kernel))


def measure(reps: int) -> list[dict]:
    """One row per layer: median ms per lowering, the fastest, and ``"auto"``'s pick."""
    rows = []
    for batch, hw, cin, cout, where in LAYERS:
        calls = {low: value_and_grads(batch, hw, cin, cout, low) for low in LOWERINGS}
        times: dict[str, list[float]] = {low: [] for low in LOWERINGS}
        for r in range(reps):
            for low, call in rotated(list(calls.items()), r):
                start = time.perf_counter()
                call()
                times[low].append((time.perf_counter() - start) * 1e3)
        ms = {low: statistics.median(t) for low, t in times.items()}
        auto = conv.resolve_lowering("auto", (batch, hw, hw, cin), (3, 3, cin, cout))
        if auto == "winograd":
            auto += str(winograd.default_tile((hw, hw)))
        fastest = min(ms, key=ms.get)
        rows.append({"batch": batch, "hw": hw, "cin": cin, "cout": cout, "where": where,
                     "ms": ms, "auto": auto, "fastest": fastest,
                     "auto_over_fastest": ms[auto] / ms[fastest]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Convolution lowering per layer (benchmarks/conv_lowering.py)", "",
             f"{info['machine']}; jax {info['jax']}; value + both gradients, median of "
             f"{info['reps']} interleaved rounds, ms ({info['date']}, load average at the start "
             f"{info['load_avg'][0]:.1f}). Thresholds: winograd for 3x3 stride-1 layers with "
             f"at least {info['winograd_min_cin']} input channels whose output map is at least "
             f"{info['winograd_min_side']} on both sides with at most "
             f"{info['winograd_max_area']} positions, with F(4x4, 3x3) (winograd4) from "
             f"{info['tile4_min_side']}x{info['tile4_min_side']} maps and F(2x2, 3x3) "
             f"(winograd2) below; else im2col up to {info['im2col_max_area']} positions; else "
             "xla.", "",
             "| layer (batch, map, Cin->Cout) | in | xla | im2col | winograd2 | winograd4 | "
             "auto picks | auto / fastest |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = " | ".join(f"**{r['ms'][low]:.1f}**" if low == r["fastest"] else
                        f"{r['ms'][low]:.1f}" for low in LOWERINGS)
        lines.append(f"| {r['batch']}, {r['hw']}x{r['hw']}, {r['cin']}->{r['cout']} | "
                     f"{r['where']} | {ms} | {r['auto']} | {r['auto_over_fastest']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", help="path without suffix (default: results/conv_lowering_<isa>)")
    args = parser.parse_args(argv)
    cpu_runtime.configure()   # as the tr-jax command line does (Eigen convolutions)
    load_avg = os.getloadavg()
    rows = measure(args.reps)
    info = {**results_io.machine_info(load_avg), "reps": args.reps,
            "im2col_max_area": conv.IM2COL_MAX_AREA,
            "winograd_min_side": conv.WINOGRAD_MIN_SIDE,
            "winograd_max_area": conv.WINOGRAD_MAX_AREA,
            "winograd_min_cin": conv.WINOGRAD_MIN_CIN,
            "tile4_min_side": winograd.TILE4_MIN_SIDE}
    results_io.write_results("conv_lowering", args.out, {"info": info, "rows": rows},
                             markdown(rows, info))


if __name__ == "__main__":
    main()

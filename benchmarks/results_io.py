"""Result files shared by the CPU benchmarks (``vs_peers.py``, ``conv_lowering.py``,
``routing_overhead.py``).

XLA's and the peers' kernels differ by vector ISA, so such results are kept apart per ISA:
``benchmarks/results/<name>_<isa>.{json,md}`` unless the caller passes its own path.
"""
from __future__ import annotations

import json
import pathlib
import platform
import time

import jax

from tr_jax import cpu_runtime

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine_info(load_avg: tuple[float, float, float]) -> dict:
    """The header every result file carries: machine (model, ISA, cores), versions, date.

    Args:
      load_avg: ``os.getloadavg()`` taken when the measurements started.
    """
    features = cpu_runtime.cpu_features()
    return {"machine": cpu_runtime.describe_machine(features), "isa": features[1],
            "jax": jax.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": load_avg}


def write_results(name: str, out: str | None, payload: dict, text: str) -> pathlib.Path:
    """Writes ``payload`` as JSON and ``text`` as Markdown; prints the Markdown.

    Args:
      name: the benchmark's name; the default path is ``RESULTS / f"{name}_{isa}"``, with
        the ISA taken from ``payload["info"]["isa"]``.
      out: a path without suffix instead of the default.
      payload: the JSON document, with ``info`` from :func:`machine_info`.
      text: the Markdown table.

    Returns:
      The path without suffix.
    """
    path = pathlib.Path(out) if out else RESULTS / f"{name}_{payload['info']['isa']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    path.with_suffix(".md").write_text(text)
    print(text)
    return path

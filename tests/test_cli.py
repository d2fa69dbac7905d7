"""Tests for the ``tr-jax affinity`` and ``tr-jax bench`` subcommands."""
import json
import pathlib

import numpy as np
import pytest

from tr_jax import cli
from test_checkpoint import fast_prng_compiles  # noqa: F401 -- module-wide, autouse

DIGITS = str(cli.DEFAULT_CONFIG)


def test_affinity_command_writes_matrix_json_and_heatmap(tmp_path, capsys):
    workdir = tmp_path / "aff"
    cli.main(["affinity", "--config", DIGITS, "--method", "lookahead", "--workdir", str(workdir),
              "--config.tasks=('even', 'prime', 'ge_5')", "--config.num_epochs=1",
              "--config.mode=all_tasks", "--config.sharing=1.0", "--config.progress=False",
              "--config.checkpoint_every_steps=0", "--config.affinity_every=4"])
    matrix = np.load(workdir / "affinity.npy")
    saved = json.loads((workdir / "affinity.json").read_text())
    assert matrix.shape == (3, 3) and np.all(np.isfinite(matrix))
    assert saved["task_names"] == ["even", "prime", "ge_5"]
    np.testing.assert_allclose(np.asarray(saved["matrix"]), matrix, rtol=1e-6)
    assert (workdir / "affinity.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "mean lookahead affinity over the run, 3 tasks" in out and "affinity.png" in out


def test_format_affinity_ranks_source_target_pairs():
    matrix = np.array([[9.0, 2.0, -1.0],
                       [0.5, 9.0, -3.0],
                       [1.0, 0.0, 9.0]])
    text = cli.format_affinity(matrix, ("a", "b", "c"), "taylor", top=1)
    helpful, harmful = text.split("most harmful")
    assert "a -> b: +2" in helpful and "b -> c: -3" in harmful
    assert "+9" not in text   # the diagonal (a task on itself) is left out
    matrix[1, 0] = matrix[2, 0] = np.nan  # never measured: counted, not ranked
    text = cli.format_affinity(matrix, ("a", "b", "c"), "taylor", top=1)
    helpful, harmful = text.split("most harmful")
    assert "2 pairs never measured" in text and "nan" not in text
    assert "a -> b: +2" in helpful and "b -> c: -3" in harmful


def test_bench_runs_the_named_script_with_its_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "selection", "--help"])
    assert stop.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_bench_peers_is_an_alias_of_vs_peers(monkeypatch):
    ran = []
    monkeypatch.setattr(cli.runpy, "run_path",
                        lambda path, run_name: ran.append((path, run_name, list(cli.sys.argv))))
    monkeypatch.setattr(cli.sys, "argv", list(cli.sys.argv))   # _bench rewrites sys.argv
    for name in ("peers", "vs_peers"):
        cli.main(["bench", name, "--help"])
    script = str(pathlib.Path(cli.BENCHMARKS) / "vs_peers.py")
    assert ran == [(script, "__main__", [script, "--help"])] * 2


def test_bench_help_and_unknown_name_list_the_peers_alias(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "peers = vs_peers" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"peers \(= vs_peers\)"):
        cli.main(["bench", "nope"])


def test_bench_unknown_name_lists_the_available_ones():
    with pytest.raises(SystemExit, match="no benchmark 'nope'.*affinity_cost"):
        cli.main(["bench", "nope"])


def test_affinity_command_refuses_an_unknown_method():
    with pytest.raises(SystemExit):
        cli.main(["affinity", "--method", "hessian"])


def test_benchmarks_directory_is_where_cli_looks():
    assert (pathlib.Path(cli.BENCHMARKS) / "affinity_cost.py").is_file()


def test_bench_does_not_offer_helper_modules():
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "jax_cases"])
    assert "jax_cases" not in str(stop.value).split("available:")[1]

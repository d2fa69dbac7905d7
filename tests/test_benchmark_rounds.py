"""benchmarks/rounds.py: the order of the cases in interleaved timing rounds."""
import sys

from tr_jax import cli

sys.path.insert(0, str(cli.BENCHMARKS))
from rounds import rotated  # noqa: E402


def test_rotated_runs_every_case_once_in_every_position():
    cases = ["xla", "im2col", "winograd"]
    orders = [rotated(cases, r) for r in range(len(cases))]
    assert orders[0] == cases
    assert orders[1] == ["im2col", "winograd", "xla"]
    for position in range(len(cases)):
        assert sorted(order[position] for order in orders) == sorted(cases)


def test_rotated_wraps_around_and_leaves_its_input_alone():
    cases = ("a", "b", "c")
    assert rotated(cases, 4) == rotated(cases, 1) == ["b", "c", "a"]
    assert cases == ("a", "b", "c")
    assert rotated([], 3) == []

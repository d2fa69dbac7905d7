"""Tests of tr_jax.grouping against an independent, official-style exhaustive search."""
import functools
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tr_jax import grouping

NAMES = "abcdefghijklmnop"


@functools.lru_cache(maxsize=None)
def _combinations(n: int, r: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(n), r)), dtype=np.int64).reshape(-1, r)


def official_search(m: dict, k: int, objective: str) -> float:
    """Exhaustive network selection on the official layout ``m[target][source]``.

    As the official notebooks: every non-empty subset is a candidate group; a task's value in
    a group is the mean of ``m[task][other]`` over the other members (TAG singleton: -1e6, HOA
    singleton: ``m[task][task]``); every combination of up to ``k`` groups covering all tasks is
    scored by the mean over tasks of the best (TAG: max, HOA: min) value.
    """
    names = list(m)
    subsets = [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]
    value = np.full((len(subsets), len(names)), np.nan)
    for row, group in enumerate(subsets):
        for task in group:
            others = [s for s in group if s != task]
            if others:
                cell = sum(m[task][s] for s in others) / len(others)
            else:
                cell = -1e6 if objective == "tag" else m[task][task]
            value[row, names.index(task)] = cell
    member = ~np.isnan(value)
    tag = objective == "tag"
    best = -np.inf if tag else np.inf
    for r in range(1, k + 1):
        combos = _combinations(len(subsets), r)
        covers = member[combos].any(axis=1).all(axis=1)
        cells = np.where(member[combos], value[combos], -1e6 if tag else 1e6)[covers]
        per_task = cells.max(axis=1) if tag else cells.min(axis=1)
        means = per_task.mean(axis=1)
        best = max(best, means.max()) if tag else min(best, means.min())
    return float(best)


def check_valid(result: grouping.Grouping, scores: np.ndarray, k: int, objective: str) -> None:
    """Structural checks shared by all methods."""
    t = len(scores)
    assert 1 <= len(result.groups) <= k
    assert set().union(*map(set, result.groups)) == set(range(t))
    assert all(list(g) == sorted(set(g)) for g in result.groups)
    assert len(result.serving) == t
    for task, g in enumerate(result.serving):
        assert task in result.groups[g]
    assert result.score == pytest.approx(
        grouping.score_groups(scores, result.groups, objective=objective), rel=1e-9, abs=1e-12)
    if objective == "tag":  # no task is served by a singleton
        assert all(len(result.groups[g]) >= 2 for g in result.serving)
    if result.bound is not None:
        tol = 1e-9 * max(1.0, abs(result.score))
        assert (result.bound >= result.score - tol if objective == "tag"
                else result.bound <= result.score + tol)


@st.composite
def problems(draw, objective):
    t = draw(st.integers(2 if objective == "tag" else 1, 7))
    k = draw(st.integers(1, min(3, t)))
    elements = st.floats(-5, 5) if objective == "tag" else st.floats(0, 5)
    scores = draw(hnp.arrays(np.float64, (t, t), elements=elements))
    return scores, k


@pytest.mark.parametrize("objective", grouping.OBJECTIVES)
def test_exact_equals_official_search(objective):
    largest = np.random.default_rng(7).uniform(-1 if objective == "tag" else 0, 1, size=(7, 7))

    @settings(max_examples=25, deadline=None)
    @given(problems(objective))
    @example((largest, 3))
    def run(problem):
        scores, k = problem
        official = grouping.to_official(scores, NAMES[:len(scores)])
        result = grouping.select_groups(scores, k, objective=objective, method="exact")
        check_valid(result, scores, k, objective)
        assert result.optimal
        assert result.score == pytest.approx(official_search(official, k, objective),
                                             rel=1e-9, abs=1e-9)

    run()


@pytest.mark.parametrize("objective", grouping.OBJECTIVES)
@pytest.mark.parametrize("method", ["milp", "heuristic"])
def test_search_scores_and_bounds_bracket_the_exact_optimum(objective, method):
    # TAG maximizes: score <= exact optimum <= bound. HOA minimizes: the other way round.
    @settings(max_examples=12, deadline=None)
    @given(problems(objective))
    def run(problem):
        scores, k = problem
        best = grouping.select_groups(scores, k, objective=objective, method="exact").score
        result = grouping.select_groups(scores, k, objective=objective, method=method)
        check_valid(result, scores, k, objective)
        tol = 1e-9 * max(1.0, abs(best))
        sign = 1.0 if objective == "tag" else -1.0
        assert sign * result.score <= sign * best + tol
        if result.bound is not None:
            assert sign * result.bound >= sign * best - tol
            assert result.optimal == (abs(result.bound - result.score) <= tol)

    run()


def test_official_layout_orientation():
    # m[target][source]: the affinity of source onto target (TAG) / error of target with source.
    m = {"a": {"a": 9.0, "b": 1.0, "c": 2.0},
         "b": {"a": 3.0, "b": 8.0, "c": 4.0},
         "c": {"a": 5.0, "b": 6.0, "c": 7.0}}
    scores = grouping.from_official(m)
    np.testing.assert_array_equal(scores, [[9.0, 3.0, 5.0], [1.0, 8.0, 6.0], [2.0, 4.0, 7.0]])
    assert scores[1, 0] == m["a"]["b"]  # scores[source, target]
    assert grouping.to_official(scores, "abc") == m
    reordered = grouping.from_official(m, task_names=["c", "a", "b"])
    assert reordered[0, 1] == m["a"]["c"]
    # Official group scores, by hand: task t in {a, b, c} scores mean(m[t][others]).
    tag_abc = np.mean([(1 + 2) / 2, (3 + 4) / 2, (5 + 6) / 2])
    assert grouping.score_groups(scores, [(0, 1, 2)]) == pytest.approx(tag_abc)
    # {a, b} serves a with m[a][b] = 1 and b with m[b][a] = 3; {b, c} serves c with m[c][b] = 6.
    assert grouping.score_groups(scores, [(0, 1), (1, 2)]) == pytest.approx(
        np.mean([1.0, max(3.0, 4.0), 6.0]))
    hoa = grouping.score_groups(scores, [(0,), (1, 2)], objective="hoa")
    assert hoa == pytest.approx(np.mean([9.0, 4.0, 6.0]))


def test_orientation_changes_the_selection():
    # Official layout: task a gains from b (10) and from c (6); nothing else helps anything.
    m = {"a": {"a": 0.0, "b": 10.0, "c": 6.0},
         "b": {"a": 0.0, "b": 0.0, "c": 0.0},
         "c": {"a": 0.0, "b": 0.0, "c": 0.0}}
    scores = grouping.from_official(m)
    result = grouping.select_groups(scores, 2, method="exact")
    # Only one group can serve a: {a, b} gives it 10 (alone, {a, b, c} would give it 8).
    assert result.score == pytest.approx(10 / 3) == official_search(m, 2, "tag")
    assert result.groups[result.serving[0]] == (0, 1)
    # Read the other way round, a would help b and c, and may help both from two groups.
    transposed = grouping.select_groups(scores.T, 2, method="exact")
    assert transposed.score == pytest.approx(16 / 3)
    assert set(transposed.groups) == {(0, 1), (0, 2)}


def test_tag_singleton_scores_minus_inf():
    scores = np.arange(9.0).reshape(3, 3)
    assert grouping.score_groups(scores, [(0,), (1, 2)]) == -np.inf
    # A singleton is harmless when its task is served by another group.
    assert grouping.score_groups(scores, [(0,), (0, 1, 2)]) == pytest.approx(
        grouping.score_groups(scores, [(0, 1, 2)]))
    result = grouping.select_groups(scores, 3, method="exact")
    assert all(len(result.groups[g]) >= 2 for g in result.serving)


def test_hoa_singleton_is_single_task_error():
    errors = np.array([[0.1, 0.5, 0.5],
                       [0.5, 0.2, 0.05],
                       [0.5, 0.05, 0.3]])
    assert grouping.score_groups(errors, [(0,), (1,), (2,)], objective="hoa") == pytest.approx(0.2)
    result = grouping.select_groups(errors, 2, objective="hoa", method="exact")
    assert result.groups == ((0,), (1, 2))  # 0 alone (0.1); 1 and 2 help each other (0.05)
    assert result.score == pytest.approx(np.mean([0.1, 0.05, 0.05]))


def planted(num_tasks, num_blocks, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(num_tasks) % num_blocks
    rng.shuffle(labels)
    scores = (labels[:, None] == labels[None, :]) + noise * rng.normal(size=(num_tasks,) * 2)
    blocks = {tuple(np.flatnonzero(labels == b)) for b in range(num_blocks)}
    return scores, blocks


@pytest.mark.parametrize("num_tasks,num_blocks,method", [(12, 3, "exact"), (60, 5, "milp")])
def test_planted_groups_are_recovered(num_tasks, num_blocks, method):
    scores, blocks = planted(num_tasks, num_blocks, noise=0.1, seed=num_tasks)
    result = grouping.select_groups(scores, num_blocks, method=method, restarts=2)
    check_valid(result, scores, num_blocks, "tag")
    assert set(result.groups) == blocks
    assert result.optimal  # the bound proves it on clearly separated groups


def greedy_baseline(scores, k):
    """Seeds k groups with tasks 0..k-1, then adds each task to the group helping it most."""
    groups = [[j] for j in range(k)]
    for task in range(k, len(scores)):
        gains = [scores[g, task].mean() for g in groups]
        groups[int(np.argmax(gains))].append(task)
    for g in groups:  # a lone seed joins its best partner's group
        if len(g) == 1:
            g.append(int(np.argmax(np.where(np.arange(len(scores)) == g[0], -np.inf,
                                            scores[:, g[0]]))))
    return grouping.score_groups(scores, groups)


@pytest.fixture(scope="module")
def large_scores():
    scores, _ = planted(312, 12, noise=1.0, seed=0)
    return scores


@pytest.mark.parametrize("k", [2, 20])
def test_large_heuristic_beats_greedy_and_milp_bound_brackets(large_scores, k):
    heuristic = grouping.select_groups(large_scores, k, method="heuristic", restarts=0)
    check_valid(heuristic, large_scores, k, "tag")
    assert heuristic.score >= greedy_baseline(large_scores, k)
    solver = grouping.select_groups(large_scores, k, method="milp", restarts=1)
    check_valid(solver, large_scores, k, "tag")
    assert solver.bound >= max(solver.score, heuristic.score)
    assert solver.bound <= heuristic.bound + 1e-9  # the LP bound beats the best-partner bound


def test_large_hoa_is_valid():
    rng = np.random.default_rng(1)
    errors = rng.uniform(0.1, 0.3, size=(312, 312))
    result = grouping.select_groups(errors, 8, objective="hoa", method="heuristic", restarts=0)
    check_valid(result, errors, 8, "hoa")
    assert result.score <= grouping.score_groups(errors, [range(312)], objective="hoa")


def test_auto_picks_by_size():
    rng = np.random.default_rng(0)
    assert grouping.select_groups(rng.normal(size=(6, 6)), 2).method == "exact"
    assert grouping.select_groups(rng.normal(size=(20, 20)), 2, restarts=0).method == "milp"


@pytest.mark.parametrize("scores,k,kwargs,match", [
    (np.zeros((3, 4)), 1, {}, "square"),
    (np.zeros((3,)), 1, {}, "square"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), 1, {}, "NaN"),
    (np.zeros((3, 3)), 0, {}, "num_groups"),
    (np.zeros((3, 3)), 4, {}, "num_groups"),
    (np.zeros((3, 3)), 1.5, {}, "num_groups"),
    (np.zeros((3, 3)), 1, {"objective": "cs"}, "objective"),
    (np.zeros((3, 3)), 1, {"method": "greedy"}, "method"),
    (np.zeros((1, 1)), 1, {}, "at least 2 tasks"),
    (np.zeros((grouping.EXACT_MAX_TASKS + 1,) * 2), 2, {"method": "exact"}, "milp"),
])
def test_select_groups_rejects_bad_input(scores, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grouping.select_groups(scores, k, **kwargs)


@pytest.mark.parametrize("groups,match", [
    ([(0, 1)], r"tasks \[2\] are in no group"),
    ([(0, 1), ()], "empty group"),
    ([(0, 1, 1), (2,)], "repeats"),
    ([(0, 1, 3), (2,)], "outside"),
])
def test_score_groups_rejects_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        grouping.score_groups(np.zeros((3, 3)), groups)


def test_from_official_rejects_missing_entries():
    with pytest.raises(ValueError, match="lacks entries"):
        grouping.from_official({"a": {"a": 1.0, "b": 2.0}, "b": {"b": 1.0}})

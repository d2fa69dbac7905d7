"""Network selection: split tasks into at most ``k`` groups from a task-pair score matrix.

Two objectives, both with the semantics of the official TAG code (google-research ``tag/
network_selection``: ``TAG_network_selection.ipynb`` and ``HOA_network_selection.ipynb``):

* ``"tag"`` -- ``scores`` are inter-task affinities, ``scores[i, j]`` = effect of source task ``i``
  onto target task ``j`` (the orientation of :func:`tr_jax.affinity.lookahead_affinity`). A task's
  score in a group is the mean of ``scores[i, t]`` over the *other* members ``i``; a singleton
  group scores ``-inf`` (the official code uses ``-1e6``). Maximize.
* ``"hoa"`` -- ``scores`` are pairwise validation errors, ``scores[s, t]`` = error of target task
  ``t`` when trained together with source task ``s`` and ``scores[t, t]`` = single-task error of
  ``t``. A task's score in a group is the mean of ``scores[s, t]`` over the other members ``s``; in
  a singleton group it is ``scores[t, t]``. Minimize.

Groups may overlap; every task must be covered; each task is *served* by its best group (highest
affinity / lowest error) and the objective is the mean over tasks of the served scores.

Orientation. The official notebooks store ``M[target][source]`` (dict of dicts keyed by task
names): TAG ``M[t][s]`` is the affinity of ``s`` onto ``t``, HOA ``M[t][s]`` the error of ``t``
trained with ``s`` and ``M[t][t]`` its single-task error. tr_jax uses ``scores[source, target]``
everywhere, so ``scores[s, t] = M[t][s]`` (a transpose) for both objectives; convert with
:func:`from_official` / :func:`to_official`, never by hand.

Methods of :func:`select_groups`:

* ``"exact"`` -- the official optimum (the official search enumerates every combination of up to
  ``k`` of the ``2^T - 1`` subsets: about 22 M for T = 9, k = 3) in ``O(2^T T log T + k 3^T)``.
  Any selection can be read as a partition of the tasks into *served sets* ``S`` (the tasks each
  group serves), so ``OPT = max`` over partitions of the tasks into at most ``k`` blocks of
  ``sum_S f(S)``, where ``f(S) = max_{g ⊇ S} sum_{t in S} score(t, g)`` is the best group serving
  ``S``. For a fixed group size, the best *helpers* ``g \\ S`` (members that are served elsewhere
  but raise the means of ``S``) are the tasks with the largest total score onto ``S``, so ``f`` is
  computed for all ``2^T`` sets by one sort each, and a dynamic program over subsets partitions the
  tasks. T = 12 takes well under a second; above :data:`EXACT_MAX_TASKS` it is refused.
* ``"milp"`` -- for T in the hundreds. Local search over served-set partitions (each block with
  its optimal helpers, several starts) fills a pool of candidate groups; a MILP (facility-location
  form) picks the best ``<= k`` groups of the pool and assigns every task to one of them; a
  Lagrangian LP gives an upper bound (TAG; a lower bound for HOA) that is valid for the *whole*
  problem, i.e. over all ``2^T`` groups, not just the pool. ``Grouping.bound`` is that bound and
  ``optimal`` is set only when the bound meets the score. Both solves use HiGHS through
  ``scipy.optimize.milp`` / ``linprog``: scipy is already a dependency, takes sparse constraint
  matrices and has a stable interface, whereas ``highspy``'s low-level API is not needed here.
* ``"heuristic"`` -- the local search alone (no MILP, no LP), with the cheap bound
  ``mean_t max_{i != t} score(i, t)`` (every task served by its best partner).
* ``"auto"`` -- ``"exact"`` up to :data:`AUTO_EXACT_MAX_TASKS` tasks, ``"milp"`` above.

The bound (maximization form; HOA is run as maximizing ``-scores``). For any prices ``π`` (T,):
``T * OPT <= sum_t π_t + k * P(π)`` with ``P(π) = max_g sum_{t in g} (score(t, g) - π_t)^+``,
because each of the ``<= k`` groups contributes ``sum_{t in S}(score(t, g) - π_t) <= P(π)``.
``score(t, g)`` for ``|g| = m`` is at most ``u_t(m)``, the mean of the ``m - 1`` largest entries of
column ``t`` (off the diagonal), so ``P(π) <= max_m`` (sum of the ``m`` largest
``(u_t(m) - π_t)^+``). The LP minimizes this over ``π`` (with cutting planes over ``m``) and the
bound is then re-evaluated exactly at the final ``π``. It is tight when the matrix has clear group
structure and can be far from the optimum on unstructured (e.g. i.i.d. random) matrices, where
``u_t(m)`` picks each column's best entries independently of the other members.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

OBJECTIVES = ("tag", "hoa")
METHODS = ("auto", "exact", "milp", "heuristic")
EXACT_MAX_TASKS = 15  # the exact DP holds (3^T - 1) / 2 subset pairs: ~7 M at T = 15
AUTO_EXACT_MAX_TASKS = 12

_REL_TOL = 1e-9  # relative tolerance for "bound meets score" and for improving moves


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A selection of task groups.

    Attributes:
      groups: tuple of groups, each a sorted tuple of task indices (groups may overlap).
      serving: per task (length T), the index into ``groups`` of the group serving it (best
        score; ties go to the lowest index).
      score: objective value: mean served affinity ("tag", maximized) or mean served error
        ("hoa", minimized).
      optimal: True when the selection is proven optimal (exact search, or bound == score).
      bound: best proven bound on the optimum (>= score for "tag", <= score for "hoa"), or None.
      method: the method that produced it ("exact", "milp" or "heuristic").
      objective: "tag" or "hoa".
    """

    groups: tuple[tuple[int, ...], ...]
    serving: tuple[int, ...]
    score: float
    optimal: bool
    bound: float | None
    method: str
    objective: str

    @property
    def gap(self) -> float | None:
        """Absolute optimality gap ``|bound - score|`` (0 when optimal), or None without bound."""
        return None if self.bound is None else abs(self.bound - self.score)


# ----------------------------------------------------------------------------- conversions


def from_official(matrix: Mapping[str, Mapping[str, float]],
                  task_names: Sequence[str] | None = None) -> np.ndarray:
    """Converts the official ``M[target][source]`` dict of dicts to ``scores[source, target]``.

    Args:
      matrix: official layout, ``matrix[t][s]`` for every pair of task names (TAG: affinity of
        ``s`` onto ``t``; HOA: error of ``t`` trained with ``s``, ``matrix[t][t]`` its single-task
        error).
      task_names: task order of the result; defaults to the key order of ``matrix``.

    Returns:
      float64 array (T, T) with ``scores[i, j] = matrix[task_names[j]][task_names[i]]``.
    """
    names = list(matrix.keys()) if task_names is None else list(task_names)
    if len(set(names)) != len(names):
        raise ValueError(f"task_names={names} has duplicates.")
    missing = [(t, s) for t in names for s in names if t not in matrix or s not in matrix[t]]
    if missing:
        raise ValueError(f"matrix lacks entries matrix[target][source] for {missing[:5]} "
                         f"({len(missing)} missing); it needs every pair of {names}.")
    return np.array([[float(matrix[t][s]) for t in names] for s in names], dtype=np.float64)


def to_official(scores: np.ndarray, task_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Inverse of :func:`from_official`: ``scores[source, target]`` -> ``M[target][source]``."""
    scores = _check_scores(scores)
    names = list(task_names)
    if len(names) != scores.shape[0] or len(set(names)) != len(names):
        raise ValueError(f"task_names must be {scores.shape[0]} distinct names, got {names}.")
    return {t: {s: float(scores[i, j]) for i, s in enumerate(names)} for j, t in enumerate(names)}


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The selection problem in maximization form.

    gain[s, t]: value of source s onto target t (TAG: scores; HOA: -scores).
    single[t]: value of t alone in a group (TAG: -inf; HOA: -scores[t, t]).
    sign: native objective = sign * internal value (+1 TAG, -1 HOA).
    """

    gain: np.ndarray
    single: np.ndarray
    sign: float

    @property
    def num_tasks(self) -> int:
        return self.gain.shape[0]


def _check_scores(scores) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty square (T, T) matrix, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"scores has NaN/inf entries at {bad}; fill or drop those tasks first.")
    return arr


def _make_problem(scores, objective: str) -> _Problem:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is unknown; use one of {OBJECTIVES}.")
    arr = _check_scores(scores)
    if objective == "tag":
        return _Problem(arr, np.full(arr.shape[0], -np.inf), 1.0)
    return _Problem(-arr, -np.diag(arr).copy(), -1.0)


def _check_groups(groups: Iterable[Iterable[int]], num_tasks: int) -> tuple[tuple[int, ...], ...]:
    out = []
    for g in groups:
        members = [int(i) for i in g]
        if not members:
            raise ValueError("groups contains an empty group; every group needs >= 1 task.")
        if len(set(members)) != len(members):
            raise ValueError(f"group {members} repeats a task.")
        if min(members) < 0 or max(members) >= num_tasks:
            raise ValueError(f"group {members} has task indices outside [0, {num_tasks}).")
        out.append(tuple(sorted(members)))
    covered = set().union(*out) if out else set()
    uncovered = sorted(set(range(num_tasks)) - covered)
    if uncovered:
        raise ValueError(f"tasks {uncovered} are in no group; every task must be covered.")
    return tuple(out)


# ----------------------------------------------------------------------------- scoring


def _member_values(prob: _Problem, member: np.ndarray) -> np.ndarray:
    """Value of each task in each group (internal max form), -inf for non-members.

    Args:
      prob: the problem.
      member: bool (G, T) membership.

    Returns:
      float64 (G, T).
    """
    size = member.sum(1, keepdims=True)
    sums = member.astype(np.float64) @ prob.gain - member * np.diag(prob.gain)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.where(size > 1, sums / np.maximum(size - 1, 1), prob.single[None, :])
    return np.where(member, vals, -np.inf)


def _evaluate(prob: _Problem, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Served value (T,) and serving group index (T,) of a cover given as bool (G, T)."""
    vals = _member_values(prob, member)
    serving = np.argmax(vals, axis=0)
    only_minus_inf = ~np.isfinite(vals.max(0))  # TAG task covered only by singletons
    serving = np.where(only_minus_inf, np.argmax(member, axis=0), serving)
    return vals[serving, np.arange(member.shape[1])], serving


def score_groups(scores, groups: Iterable[Iterable[int]], *, objective: str = "tag") -> float:
    """Objective value of a given selection, with the official semantics.

    Args:
      scores: (T, T) matrix, ``scores[source, target]`` (see the module docstring).
      groups: iterable of groups of task indices; they may overlap and must cover every task.
      objective: "tag" (mean served affinity, singleton = -inf) or "hoa" (mean served error,
        singleton = single-task error ``scores[t, t]``).

    Returns:
      The mean over tasks of each task's best score among its groups (-inf for "tag" if a task
      is covered only by singleton groups).
    """
    prob = _make_problem(scores, objective)
    member = _membership(_check_groups(groups, prob.num_tasks), prob.num_tasks)
    best, _ = _evaluate(prob, member)
    return float(prob.sign * best.mean())


def _membership(groups: Sequence[Sequence[int]], num_tasks: int) -> np.ndarray:
    member = np.zeros((len(groups), num_tasks), dtype=bool)
    for row, g in enumerate(groups):
        member[row, list(g)] = True
    return member


def _finish(prob: _Problem, member: np.ndarray, method: str, objective: str,
            bound: float | None) -> Grouping:
    """Builds a Grouping from bool (G, T) membership; ``bound`` in internal max form."""
    member = np.unique(member, axis=0)[::-1]  # dedupe; deterministic order
    best, serving = _evaluate(prob, member)
    used = np.unique(serving)  # drop groups that serve nobody and are not needed for cover
    member, serving = member[used], np.searchsorted(used, serving)
    internal = float(best.mean())
    if bound is not None and bound < internal:
        if internal - bound > _REL_TOL * max(1.0, abs(internal)):
            raise AssertionError(f"{method}: upper bound {bound} below the score {internal} "
                                 "of a feasible grouping; the bound computation is wrong.")
        bound = internal  # rounding only
    optimal = bound is not None and bound - internal <= _REL_TOL * max(1.0, abs(internal))
    groups = tuple(tuple(int(i) for i in np.flatnonzero(row)) for row in member)
    native_bound = None if bound is None else float(prob.sign * bound)
    return Grouping(groups=groups, serving=tuple(int(s) for s in serving),
                    score=float(prob.sign * internal), optimal=bool(optimal),
                    bound=native_bound, method=method, objective=objective)


# ----------------------------------------------------------------------------- served sets


def _best_fill(base: np.ndarray, size: np.ndarray, cand: np.ndarray, single: np.ndarray,
               with_order: bool = False,
               top: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Best value of served sets completed with their best helpers.

    Row r describes a served set S of ``size[r]`` tasks with ``base[r] = sum_{t in S} sum_{i in
    S, i != t} gain[i, t]`` and ``cand[r, i] = sum_{t in S} gain[i, t]`` for each allowed helper
    ``i`` (-inf otherwise). With ``h`` helpers the group has ``size + h`` members and value
    ``(base + top_h(cand)) / (size + h - 1)``; a lone task (size 1, h = 0) is worth ``single[r]``
    and an empty set 0. For a fixed ``h`` the best helpers are the ``h`` largest ``cand``, and the
    value is unimodal in ``h >= 1`` (the next helper pays iff its ``cand`` beats the current
    value), so only the ``top`` best are scanned unless a row's optimum reaches ``top``.

    Returns:
      value (N,), number of helpers (N,), and (if ``with_order``) the helper order (N, T),
      best first.
    """
    num_rows, width = cand.shape
    if with_order:
        order = np.argsort(-cand, axis=1, kind="stable")
        ranked = np.take_along_axis(cand, order, axis=1)
    else:
        order, ranked = None, np.sort(cand, axis=1)[:, ::-1]
    value, helpers = _scan_helpers(base, size, ranked[:, :top], single)
    redo = np.flatnonzero(helpers >= min(top, width))
    if redo.size and width > top:
        value[redo], helpers[redo] = _scan_helpers(base[redo], size[redo], ranked[redo],
                                                   single[redo])
    return value, helpers, order


def _scan_helpers(base: np.ndarray, size: np.ndarray, ranked: np.ndarray,
                  single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and helper count for each row given its helper contributions, best first."""
    denom = size[:, None] + np.arange(ranked.shape[1])[None, :]  # size + h - 1, h = 1..width
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = (base[:, None] + np.cumsum(ranked, axis=1)) / denom
        alone = np.where(size == 1, single, base / (size - 1))  # h = 0
    vals = np.where(denom > 0, vals, -np.inf)
    helpers = np.argmax(vals, axis=1)
    value = vals[np.arange(len(base)), helpers]
    use_alone = (size >= 1) & (alone >= value)
    value = np.where(size == 0, 0.0, np.where(use_alone, alone, value))
    helpers = np.where(use_alone | (size == 0), 0, helpers + 1)
    return value, helpers


def _served_row(prob: _Problem, served: np.ndarray) -> tuple[float, np.ndarray, float]:
    """``base``, helper contributions ``cand`` (T,) and lone value of one non-empty served set."""
    gain = prob.gain
    onto = gain[served].sum(0)  # sum_{i in S} gain[i, t]
    base = float((onto - np.diag(gain))[served].sum())
    cand = np.where(served, -np.inf, gain[:, served].sum(1))
    single = float(prob.single[served][0]) if served.sum() == 1 else -np.inf
    return base, cand, single


def _served_value(prob: _Problem, served: np.ndarray) -> tuple[float, np.ndarray]:
    """f(S) and the optimal group (bool (T,)) for one non-empty served set (bool (T,))."""
    base, cand, single = _served_row(prob, served)
    value, helpers, order = _best_fill(np.array([base]), np.array([served.sum()]), cand[None],
                                       np.array([single]), with_order=True)
    group = served.copy()
    group[order[0, :helpers[0]]] = True
    return float(value[0]), group


# ----------------------------------------------------------------------------- exact


@functools.lru_cache(maxsize=4)
def _partition_pairs(num_tasks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (U, S) of bitmasks with S ⊆ U and lowest bit of U in S, grouped by U.

    Returns:
      U (P,), S (P,) int32 sorted by U (U = 1 .. 2^T - 1), and segment starts (2^T - 1,).
    """
    universe = np.arange(1, 2 ** num_tasks, dtype=np.int32)
    low = universe & -universe
    rest = universe ^ low
    popcount = np.zeros_like(rest)
    for b in range(num_tasks):
        popcount += (rest >> b) & 1
    counts = 1 << popcount
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    u = np.repeat(universe, counts)
    r = np.arange(u.size, dtype=np.int32) - np.repeat(starts, counts).astype(np.int32)
    rest_rep = np.repeat(rest, counts)
    s = np.repeat(low, counts)
    next_bit = np.zeros_like(r)
    for b in range(num_tasks):  # deposit the bits of r onto the set bits of rest
        has = (rest_rep >> b) & 1
        s |= ((r >> next_bit) & 1 & has) << b
        next_bit += has
    return u, s, starts


def _subset_table(prob: _Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f(S) for every bitmask S (f(∅) = 0), with helper counts and orders for reconstruction."""
    t = prob.num_tasks
    masks = np.arange(2 ** t, dtype=np.int64)
    bits = ((masks[:, None] >> np.arange(t)) & 1).astype(bool)
    fbits = bits.astype(np.float64)
    gain = prob.gain
    cand = np.where(bits, -np.inf, fbits @ gain.T)  # cand[S, i] = sum_{t in S} gain[i, t]
    base = ((fbits @ gain) * fbits).sum(1) - fbits @ np.diag(gain)
    size = bits.sum(1)
    single = np.where(size == 1, prob.single[np.argmax(bits, axis=1)], -np.inf)
    return _best_fill(base, size, cand, single, with_order=True)


def _solve_exact(prob: _Problem, num_groups: int) -> np.ndarray:
    """Optimal selection as bool (G, T) membership via the served-set partition DP."""
    t = prob.num_tasks
    if t > EXACT_MAX_TASKS:
        raise ValueError(f"method='exact' supports up to {EXACT_MAX_TASKS} tasks (memory grows as "
                         f"3^T), got T={t}; use method='milp' (bounded gap) or 'heuristic'.")
    value, helpers, order = _subset_table(prob)
    u, s, starts = _partition_pairs(t)
    best = np.full(2 ** t, -np.inf)
    best[0] = 0.0
    choices = []
    index = np.arange(u.size)
    for _ in range(num_groups):
        cand = value[s] + best[u ^ s]
        seg_best = np.maximum.reduceat(cand, starts)
        first = np.minimum.reduceat(np.where(cand == np.repeat(seg_best, np.diff(
            np.append(starts, u.size))), index, u.size), starts)
        new_best = np.concatenate([[0.0], seg_best])
        choices.append(np.concatenate([[0], s[first]]))
        if np.array_equal(new_best, best):
            break
        best = new_best
    rows, remaining = [], 2 ** t - 1
    for choice in reversed(choices):
        if remaining == 0:
            break
        served = choice[remaining]
        group = ((served >> np.arange(t)) & 1).astype(bool)
        group[order[served, :helpers[served]]] = True
        rows.append(group)
        remaining ^= int(served)
    return np.array(rows)


# ----------------------------------------------------------------------------- local search


class _Blocks:
    """A partition of the tasks into <= k served sets, with all one-task move values cached.

    ``toggled[b, t]`` is f(S_b ∪ {t}) for t outside block b and f(S_b \\ {t}) for t inside.
    """

    def __init__(self, prob: _Problem, labels: np.ndarray, num_blocks: int,
                 singleton_values: np.ndarray):
        self.prob = prob
        self.labels = labels.copy()
        self.singleton_values = singleton_values
        t = prob.num_tasks
        self.value = np.zeros(num_blocks)
        self.toggled = np.zeros((num_blocks, t))
        for b in range(num_blocks):
            self._refresh(b)

    def _refresh(self, b: int) -> None:
        prob, served = self.prob, self.labels == b
        n = int(served.sum())
        if n == 0:
            self.value[b], self.toggled[b] = 0.0, self.singleton_values
            return
        gain, diag = prob.gain, np.diag(prob.gain)
        base, own_cand, own_single = _served_row(prob, served)
        self.value[b] = _best_fill(np.array([base]), np.array([n]), own_cand[None],
                                   np.array([own_single]))[0][0]
        onto = gain[served].sum(0)  # sum_{i in S} gain[i, t]
        from_ = gain[:, served].sum(1)  # sum_{t in S} gain[i, t]
        # Row t: the set with t added (t outside S) or removed (t inside S).
        sgn = np.where(served, -1.0, 1.0)
        row_base = base + sgn * (from_ + onto - 2.0 * diag * served)
        cand = gain.T * sgn[:, None]
        cand += from_[None, :]
        cand[:, served] = -np.inf  # members of S stay members, never helpers ...
        cand[np.flatnonzero(served), np.flatnonzero(served)] = from_[served] - diag[served]
        outside = np.flatnonzero(~served)  # ... but a removed task may help; an added one not
        cand[outside, outside] = -np.inf
        single = np.full(len(served), -np.inf)
        if n == 2:  # removing one of two leaves the other alone
            a, c = np.flatnonzero(served)
            single[a], single[c] = prob.single[c], prob.single[a]
        self.toggled[b] = _best_fill(row_base, n + sgn.astype(np.int64), cand, single)[0]

    def total(self) -> float:
        return float(self.value.sum())

    def improve(self, max_rounds: int) -> None:
        """Best-improvement relocation of single tasks, several disjoint moves per round."""
        t = self.prob.num_tasks
        tasks = np.arange(t)
        for _ in range(max_rounds):
            delta = self.toggled - self.value[:, None]  # (k, T) gain of entering block b
            leave = delta[self.labels, tasks]  # gain of leaving own block
            move = delta.T + leave[:, None]  # (T, k)
            move[tasks, self.labels] = -np.inf
            empty = np.flatnonzero(np.bincount(self.labels, minlength=len(self.value)) == 0)
            move[:, empty[1:]] = -np.inf  # empty blocks are interchangeable
            tol = _REL_TOL * max(1.0, abs(self.total()))
            flat = np.argsort(-move, axis=None)
            touched, applied = set(), []
            for idx in flat[: 4 * len(self.value) + 8]:
                task, dest = divmod(int(idx), len(self.value))
                if move[task, dest] <= tol:
                    break
                src = int(self.labels[task])
                if src in touched or dest in touched:
                    continue
                touched.update((src, dest))
                applied.append((task, dest))
            if not applied:
                return
            for task, dest in applied:
                self.labels[task] = dest
            for b in touched:
                self._refresh(b)

    def groups(self) -> np.ndarray:
        rows = [_served_value(self.prob, self.labels == b)[1]
                for b in np.unique(self.labels)]
        return np.array(rows)


def _singleton_values(prob: _Problem) -> np.ndarray:
    """f({t}) for every task: t alone or with its best helpers."""
    gain = prob.gain
    cand = np.where(np.eye(len(gain), dtype=bool), -np.inf, gain.T)
    value, _, _ = _best_fill(np.zeros(len(gain)), np.ones(len(gain), dtype=np.int64), cand,
                             prob.single)
    return value


def _agglomerate(prob: _Problem, num_groups: int, singleton_values: np.ndarray) -> np.ndarray:
    """Greedy merging of served sets (without helpers) down to ``num_groups`` blocks."""
    gain = prob.gain
    t = len(gain)
    cross = gain + gain.T  # cross[a, b] = sum over a->b and b->a
    np.fill_diagonal(cross, 0.0)
    within = np.zeros(t)  # sum_{t in S} sum_{i in S \ t} gain[i, t]
    size = np.ones(t)
    value = singleton_values.copy()
    alive = np.ones(t, dtype=bool)
    labels = np.arange(t)
    for _ in range(t - num_groups):
        merged = (within[:, None] + within[None, :] + cross) / (size[:, None] + size[None, :] - 1)
        score = merged - value[:, None] - value[None, :]
        score[~alive] = -np.inf
        score[:, ~alive] = -np.inf
        np.fill_diagonal(score, -np.inf)
        a, b = np.unravel_index(np.argmax(score), score.shape)
        within[a] += within[b] + cross[a, b]
        size[a] += size[b]
        value[a] = within[a] / (size[a] - 1)
        cross[a] += cross[b]
        cross[:, a] += cross[:, b]
        cross[a, a] = 0.0
        alive[b] = False
        labels[labels == b] = a
    return np.unique(labels, return_inverse=True)[1]


def _local_search(prob: _Problem, num_groups: int, restarts: int,
                  seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Iterated local search from the agglomerative start, then ``restarts`` more runs that
    alternately perturb the best partition (a tenth of the tasks reassigned) and start afresh.

    Returns:
      The best membership (G, T) and the final membership of every run (the pool).
    """
    rng = np.random.default_rng(seed)
    singleton_values = _singleton_values(prob)
    t = prob.num_tasks
    labels = _agglomerate(prob, num_groups, singleton_values)
    best_labels, best_total, best_run, pool = labels, -np.inf, 0, []
    for run in range(restarts + 1):
        if run > 0 and run % 2 == 1:
            labels = best_labels.copy()
            moved = rng.choice(t, size=max(1, t // 10), replace=False)
            labels[moved] = rng.integers(num_groups, size=moved.size)
        elif run > 0:
            labels = rng.integers(num_groups, size=t)
        blocks = _Blocks(prob, labels, num_groups, singleton_values)
        blocks.improve(max_rounds=20 * t)
        pool.append(blocks.groups())
        if blocks.total() > best_total:
            best_labels, best_total, best_run = blocks.labels.copy(), blocks.total(), run
    return pool[best_run], pool


# ----------------------------------------------------------------------------- MILP and bound


def _pool_milp(prob: _Problem, pool: np.ndarray, num_groups: int,
               time_limit: float) -> np.ndarray | None:
    """Best <= k groups of the pool (bool (P, T)) with a task assignment; None if HiGHS fails."""
    vals = _member_values(prob, pool)
    g_idx, t_idx = np.nonzero(pool & np.isfinite(vals))
    num_pool, num_pairs, t = len(pool), len(g_idx), prob.num_tasks
    pair = np.arange(num_pairs)
    cover = scipy.sparse.csr_array((np.ones(num_pairs), (t_idx, num_pool + pair)),
                                   shape=(t, num_pool + num_pairs))
    link = scipy.sparse.csr_array(
        (np.concatenate([np.ones(num_pairs), -np.ones(num_pairs)]),
         (np.concatenate([pair, pair]), np.concatenate([num_pool + pair, g_idx]))),
        shape=(num_pairs, num_pool + num_pairs))
    count = scipy.sparse.csr_array(
        (np.ones(num_pool), (np.zeros(num_pool, dtype=int), np.arange(num_pool))),
        shape=(1, num_pool + num_pairs))
    constraints = [scipy.optimize.LinearConstraint(cover, 1.0, 1.0),
                   scipy.optimize.LinearConstraint(link, -np.inf, 0.0),
                   scipy.optimize.LinearConstraint(count, 0.0, num_groups)]
    cost = np.concatenate([np.zeros(num_pool), -vals[g_idx, t_idx]])
    integrality = np.concatenate([np.ones(num_pool), np.zeros(num_pairs)])
    res = scipy.optimize.milp(cost, constraints=constraints, integrality=integrality,
                              bounds=scipy.optimize.Bounds(0.0, 1.0),
                              options={"time_limit": time_limit})
    if res.x is None:
        return None
    return pool[res.x[:num_pool] > 0.5]


def _column_bounds(prob: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """Group sizes m and u[m_index, t] >= value of t in any group of m members."""
    gain = prob.gain.copy()
    t = len(gain)
    np.fill_diagonal(gain, -np.inf)
    col = -np.sort(-gain, axis=0)[: t - 1]  # (T - 1, T) column entries, best first
    sizes = np.arange(2, t + 1)
    u = np.cumsum(col, axis=0) / (sizes - 1)[:, None]
    if np.isfinite(prob.single).all():
        sizes = np.concatenate([[1], sizes])
        u = np.concatenate([prob.single[None, :], u])
    return sizes, u


def _pricing_bound(sizes: np.ndarray, u: np.ndarray, prices: np.ndarray) -> np.ndarray:
    """Per group size m: upper bound on max_{|g|=m} sum_{t in g} (value(t, g) - π_t)^+."""
    excess = -np.sort(-np.maximum(u - prices[None, :], 0.0), axis=1)
    top = np.cumsum(excess, axis=1)
    return top[np.arange(len(sizes)), sizes - 1]


def _lagrangian_bound(prob: _Problem, num_groups: int, max_iters: int = 40) -> float:
    """Upper bound on the optimum (mean over tasks, max form), valid over all 2^T groups.

    Minimizes ``sum(π) + k max_m P_m(π)`` (module docstring) by an LP over the group sizes
    ``m`` in an active set, grown with the sizes whose ``P_m`` exceeds the LP's value (cutting
    planes). Every ``π`` met gives a valid bound, evaluated exactly over all sizes.
    """
    sizes, u = _column_bounds(prob)
    t, k = prob.num_tasks, num_groups
    prices = u.max(0)  # trivial bound: every task at its best possible value
    best = float(prices.sum() + k * _pricing_bound(sizes, u, prices).max())
    grid = np.geomspace(sizes[0], sizes[-1], 8).round()
    active = sorted(set(np.searchsorted(sizes, grid).tolist()))
    for _ in range(max_iters):
        na = len(active)
        # variables: π (t), z (1), θ (na), e (na * t)
        nvar = t + 1 + na + na * t
        cost = np.zeros(nvar)
        cost[:t], cost[t] = 1.0, k
        # z >= m θ_m + sum_t e_{m,t}
        rows_a, cols_a, vals_a = [], [], []
        for j, m_idx in enumerate(active):
            e0 = t + 1 + na + j * t
            rows_a += [j] * (t + 2)
            cols_a += [t, t + 1 + j] + list(range(e0, e0 + t))
            vals_a += [-1.0, float(sizes[m_idx])] + [1.0] * t
        # -π_t - θ_m - e_{m,t} <= -u_m[t]
        r = np.arange(na * t)
        m_of, t_of = r // t, r % t
        rows_b = np.concatenate([r, r, r]) + na
        cols_b = np.concatenate([t_of, t + 1 + m_of, t + 1 + na + r])
        a_ub = scipy.sparse.csr_array(
            (np.concatenate([vals_a, -np.ones(3 * na * t)]),
             (np.concatenate([rows_a, rows_b]), np.concatenate([cols_a, cols_b]))),
            shape=(na + na * t, nvar))
        b_ub = np.concatenate([np.zeros(na), -u[np.array(active)].ravel()])
        bounds = [(None, None)] * t + [(0, None)] * (1 + na + na * t)
        res = scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds,
                                     method="highs-ipm")
        if res.x is None:
            break
        prices = res.x[:t]
        pricing = _pricing_bound(sizes, u, prices)
        best = min(best, float(prices.sum() + k * pricing.max()))
        violated = np.argsort(-pricing)[:6]
        new = [int(m) for m in violated
               if pricing[m] > res.x[t] + 1e-9 * max(1.0, abs(res.x[t])) and m not in active]
        if not new:
            break
        active = sorted(set(active) | set(new))
    return best / t


# ----------------------------------------------------------------------------- public API


def select_groups(scores, num_groups: int, *, objective: str = "tag", method: str = "auto",
                  restarts: int | None = None, seed: int = 0,
                  time_limit: float = 30.0) -> Grouping:
    """Chooses at most ``num_groups`` task groups (network selection).

    Args:
      scores: (T, T) matrix ``scores[source, target]``: TAG affinities or HOA pairwise errors
        (single-task errors on the diagonal). Convert official dicts with :func:`from_official`.
      num_groups: k, the most groups (networks) allowed, 1 <= k <= T.
      objective: "tag" (maximize mean served affinity; singletons forbidden) or "hoa" (minimize
        mean served error; a singleton's error is the single-task error).
      method: "exact", "milp", "heuristic" or "auto" (see the module docstring).
      restarts: local-search restarts for "milp"/"heuristic" (deterministic in ``seed``);
        default ``clip(1024 // T, 8, 64)``: many for small T, where each run is cheap.
      seed: seed of those restarts.
      time_limit: seconds for the pool MILP of "milp".

    Returns:
      A :class:`Grouping`. "exact" is proven optimal; "milp" carries a bound valid for the whole
      problem; "heuristic" carries the cheap best-partner bound.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {METHODS}.")
    prob = _make_problem(scores, objective)
    t = prob.num_tasks
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
            or not 1 <= num_groups <= t:
        raise ValueError(f"num_groups={num_groups!r} must be an integer in [1, T={t}].")
    if objective == "tag" and t < 2:
        raise ValueError("objective='tag' needs at least 2 tasks: a lone task scores -inf.")
    num_groups = int(num_groups)
    if method == "auto":
        method = "exact" if t <= AUTO_EXACT_MAX_TASKS else "milp"
    if method == "exact":
        member = _solve_exact(prob, num_groups)
        return _finish(prob, member, method, objective, bound=float(
            _evaluate(prob, member)[0].mean()))
    if restarts is None:
        restarts = int(np.clip(1024 // t, 8, 64))
    best, pool = _local_search(prob, num_groups, restarts, seed)
    if method == "heuristic":
        _, u = _column_bounds(prob)
        return _finish(prob, best, method, objective, bound=float(u.max(0).mean()))
    candidates = np.unique(np.concatenate(pool), axis=0)
    chosen = _pool_milp(prob, candidates, num_groups, time_limit)
    if chosen is not None and len(chosen) and \
            _evaluate(prob, chosen)[0].mean() > _evaluate(prob, best)[0].mean():
        best = chosen
    bound = _lagrangian_bound(prob, num_groups)
    return _finish(prob, best, method, objective, bound=bound)

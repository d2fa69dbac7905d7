"""Figures for affinity matrices, routing masks, sharing sweeps and cost scaling.

Every function takes plain arrays, draws with matplotlib's object API on the Agg canvas (no
pyplot, no global backend switch: safe in scripts, tests and notebooks alike), returns the
:class:`~matplotlib.figure.Figure` and, given ``path``, also writes it as a PNG. Pass ``ax`` to
draw into an existing axes (e.g. side-by-side panels); the returned figure is then its figure.

Orientation follows the rest of tr_jax: ``matrix[i, j]`` is the effect of source task ``i``
onto target task ``j``; sources are rows (y axis), targets columns (x axis).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import offset_copy

ANNOTATE_MAX_TASKS = 12  # cells get their value written in when T is at most this
LABEL_MAX_TASKS = 60  # axes carry the task names when T is at most this
_GROUP_COLORS = colormaps["Dark2"].colors  # distinct from the red/blue heat colours


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Writes ``fig`` to ``path`` as a PNG at the figure's own dpi (so that data coordinates
    map to pixels through ``ax.transData``) and returns it."""
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi, format="png")
    return fig


def _check_groups(groups: Sequence[Sequence[int]], num_tasks: int) -> list[list[int]]:
    out = []
    for g in groups:
        members = sorted({int(t) for t in g})
        if not members or members[0] < 0 or members[-1] >= num_tasks:
            raise ValueError(f"groups must be non-empty sequences of task indices in "
                             f"[0, {num_tasks}); got {tuple(g)}.")
        out.append(members)
    return out


def group_order(groups: Sequence[Sequence[int]], num_tasks: int) -> np.ndarray:
    """The task order that makes groups contiguous.

    Groups in the given order, each group's members in increasing index; a task in several
    groups appears at its first group; tasks in no group come last.

    Returns:
      int array (T,): ``order[p]`` is the task shown at position ``p``.
    """
    seen: dict[int, None] = {}
    for members in _check_groups(groups, num_tasks):
        seen.update(dict.fromkeys(members))
    seen.update(dict.fromkeys(range(num_tasks)))
    return np.fromiter(seen, int, num_tasks)


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted ``positions``: [(first, last), ...]."""
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(positions) - 1]])
    return [(int(positions[s]), int(positions[e])) for s, e in zip(starts, ends)]


def _annotate_cells(ax: Axes, values: np.ndarray, vmax: float) -> None:
    """Writes every finite cell's value in it, with 2 significant digits at ``vmax`` > 0."""
    if not vmax > 0:
        raise ValueError(f"vmax={vmax} must be > 0 (the colour scale spans [-vmax, vmax]).")
    decimals = max(0, 1 - int(np.floor(np.log10(vmax))))
    for (p, q), value in np.ndenumerate(values):
        if np.isfinite(value):
            shown = round(float(value), decimals) + 0.0  # + 0.0: no "-0.00"
            ax.text(q, p, f"{shown:.{decimals}f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 * vmax else "black")


def _outline_groups(ax: Axes, groups: list[list[int]], order: np.ndarray,
                    task_names: Sequence[str]) -> None:
    """Outlines each group's cells (members x members) of the matrix shown in ``order``, as
    rectangles over the runs of consecutive positions, one legend entry per group."""
    position = np.argsort(order)
    for g, members in enumerate(groups):
        names = [task_names[i] for i in members]
        label = f"group {g}: " + (", ".join(names) if len(names) <= 8 else
                                  ", ".join(names[:6]) + f", ... ({len(names)} tasks)")
        runs = _runs(np.sort(position[members]))
        for r0, r1 in runs:
            for c0, c1 in runs:
                ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1,
                                       fill=False, linewidth=2.5, label=label,
                                       edgecolor=_GROUP_COLORS[g % len(_GROUP_COLORS)]))
                label = None


def affinity_heatmap(matrix, task_names: Sequence[str],
                     groups: Sequence[Sequence[int]] | None = None,
                     path: str | os.PathLike | None = None, *, title: str | None = None,
                     show_diagonal: bool = False, annotate: bool | None = None,
                     vmax: float | None = None, cmap: str = "RdBu_r",
                     ax: Axes | None = None) -> Figure:
    """Heatmap of a task-affinity matrix, with task groups outlined.

    The colour scale is symmetric around 0 (white), red = positive (source helps target),
    blue = negative. The figure stays a few inches wide at T in the hundreds (task names are
    shown up to ``LABEL_MAX_TASKS`` tasks). With ``groups``, tasks are reordered so each group is a contiguous block
    (see :func:`group_order`) and every group's cells (members x members) are outlined in its
    colour; a group whose members cannot all be contiguous (overlapping groups) is outlined
    as several rectangles covering exactly its cells.

    Args:
      matrix: (T, T) ``matrix[i, j]`` = source task i onto target task j (e.g. TAG's Z or a
        gradient cosine matrix).
      task_names: T names.
      groups: optional task groups (e.g. ``select_groups(...).groups``), sequences of indices.
      path: write the figure here as a PNG.
      title: axes title.
      show_diagonal: colour the diagonal too; by default it is grey and left out of the
        colour scale (self-affinity is large and uninformative).
      annotate: write each cell's value in it (default: when T <= ``ANNOTATE_MAX_TASKS``).
      vmax: colour-scale limit (default: the largest absolute coloured value).
      cmap: a diverging matplotlib colormap name.
      ax: draw into this axes instead of a new figure.

    Returns:
      The figure.
    """
    z = np.asarray(matrix, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != z.shape[1]:
        raise ValueError(f"matrix must be square (T, T); got shape {z.shape}.")
    t = z.shape[0]
    if len(task_names) != t:
        raise ValueError(f"task_names has {len(task_names)} names for a {t}x{t} matrix.")
    order = group_order(groups or (), t)
    shown = np.ma.masked_invalid(z[np.ix_(order, order)])
    if not show_diagonal:
        shown[np.diag_indices(t)] = np.ma.masked
    if vmax is None:
        vmax = float(np.abs(shown).max()) if shown.count() else 1.0
        vmax = vmax or 1.0
    labeled = t <= LABEL_MAX_TASKS
    names = [task_names[i] for i in order]
    margin = 0.07 * max(map(len, names)) if labeled else 0.0
    cell = min(0.5, 10.0 / t)  # inches: the matrix stays within 10 x 10 inches at T = 312
    fig, ax = _axes(ax, (2.4 + margin + cell * t,
                         1.6 + margin + cell * t + (0.2 * len(groups) if groups else 0)))
    image = ax.imshow(shown, cmap=colormaps[cmap].with_extremes(bad="0.85"), vmin=-vmax,
                      vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    if labeled:
        ax.set_xticks(range(t), names, rotation=90)
        ax.set_yticks(range(t), names)
    ax.set_xlabel("target j" if labeled else f"target j ({t} tasks, names not shown)")
    ax.set_ylabel("source i")
    ax.set_title(title if title is not None else "affinity[i, j]: source i onto target j")
    if annotate if annotate is not None else t <= ANNOTATE_MAX_TASKS:
        _annotate_cells(ax, shown.filled(np.nan), vmax)
    if groups:
        _outline_groups(ax, _check_groups(groups, t), order, task_names)
        # The legend goes under the x tick labels and the x label: shift it down by their
        # height (fixed by their fonts, whatever the layout does to the axes).
        below = sum(max((t.get_window_extent().height for t in texts), default=0.0)
                    for texts in (ax.get_xticklabels(), [ax.xaxis.label])) * 72 / fig.dpi + 12
        ax.legend(loc="upper center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0),
                  bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-below, units="points"))
    return _finish(fig, path)


def mask_matrix(masks, task_names: Sequence[str] | None = None,
                path: str | os.PathLike | None = None, *, sort_units: bool = False,
                title: str | None = None, ax: Axes | None = None) -> Figure:
    """Binary routing masks of one layer as an image: black = the task uses the unit.

    Args:
      masks: (T, C) 0/1 array (e.g. from :func:`tr_jax.routing.make_masks`).
      task_names: optional T row labels.
      path: write the figure here as a PNG.
      sort_units: order units by how many tasks use them (most shared first).
      title: axes title (default: shape and the mean fraction of units a task keeps).
      ax: draw into this axes instead of a new figure.

    Returns:
      The figure.
    """
    m = np.asarray(masks, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"masks must be (T, C); got shape {m.shape}.")
    t, c = m.shape
    if task_names is not None and len(task_names) != t:
        raise ValueError(f"task_names has {len(task_names)} names for {t} mask rows.")
    if sort_units:
        m = m[:, np.argsort(-m.sum(0), kind="stable")]
    fig, ax = _axes(ax, (min(12.0, 2.0 + 0.1 * c), 1.0 + 0.25 * t))
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("unit" + (" (sorted by tasks using it)" if sort_units else ""))
    ax.set_ylabel("task")
    if task_names is not None:
        ax.set_yticks(range(t), list(task_names), fontsize=7)
    ax.set_title(title if title is not None else
                 f"routing masks ({t} tasks x {c} units), each task keeps {m.mean():.0%}")
    return _finish(fig, path)


def _label(ax: Axes, xlabel: str, ylabel: str, title: str,
           legend_title: str | None = None) -> None:
    """Axis labels, title, a light grid and the legend of a line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title=legend_title, fontsize=8)


def _series(values, length: int, name: str) -> np.ndarray:
    """``values`` as a (length, R) float array: R repeats (R = 1 for a plain vector)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) or ({length}, repeats); "
                         f"got {v.shape}.")
    return v


def accuracy_vs_sharing(sharings, accuracies_by_scheme: Mapping[str, object],
                        path: str | os.PathLike | None = None, *,
                        ylabel: str = "mean test accuracy", title: str | None = None,
                        ax: Axes | None = None) -> Figure:
    """Accuracy against the sharing ratio σ, one line per mask scheme.

    Args:
      sharings: (S,) sharing ratios σ.
      accuracies_by_scheme: scheme name -> (S,) accuracies, or (S, R) over R seeds (the line
        is the mean, the band the min..max). NaN marks a σ that was not run (e.g. σ = 0 with
        the ``"random"`` scheme, which leaves a task no unit).
      path: write the figure here as a PNG.
      ylabel: y-axis label.
      title: axes title.
      ax: draw into this axes instead of a new figure.

    Returns:
      The figure.
    """
    s = np.asarray(sharings, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"sharings must be a vector (S,); got shape {s.shape}.")
    fig, ax = _axes(ax, (5.0, 3.4))
    for scheme, values in accuracies_by_scheme.items():
        v = _series(values, len(s), f"accuracies_by_scheme[{scheme!r}]")
        ok = np.isfinite(v).any(1)
        mean = np.nanmean(np.where(ok[:, None], v, 0.0), axis=1)
        line, = ax.plot(s[ok], mean[ok], marker="o", label=scheme)
        if v.shape[1] > 1:
            ax.fill_between(s[ok], np.nanmin(v[ok], 1), np.nanmax(v[ok], 1),
                            color=line.get_color(), alpha=0.2)
    _label(ax, "sharing ratio σ (1 = fully shared)", ylabel, title or "accuracy vs sharing",
           legend_title="mask scheme")
    return _finish(fig, path)


def cost_vs_tasks(ts, seconds_by_method: Mapping[str, object],
                  path: str | os.PathLike | None = None, *, ylabel: str = "seconds per step",
                  title: str | None = None, ax: Axes | None = None) -> Figure:
    """Cost against the number of tasks T on log-log axes, one line per method.

    Args:
      ts: (N,) task counts.
      seconds_by_method: method name -> (N,) seconds (NaN: not measured at that T).
      path: write the figure here as a PNG.
      ylabel: y-axis label.
      title: axes title.
      ax: draw into this axes instead of a new figure.

    Returns:
      The figure.
    """
    t = np.asarray(ts, dtype=np.float64)
    if t.ndim != 1 or (t <= 0).any():
        raise ValueError(f"ts must be a vector of positive task counts; got {ts!r}.")
    fig, ax = _axes(ax, (5.0, 3.4))
    for method, values in seconds_by_method.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != t.shape:
            raise ValueError(f"seconds_by_method[{method!r}] has shape {v.shape}; ts has "
                             f"{t.shape}.")
        ok = np.isfinite(v) & (v > 0)
        ax.plot(t[ok], v[ok], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(t, [f"{v:g}" for v in t])  # the measured T's, written plainly
    ax.xaxis.set_minor_formatter(NullFormatter())
    _label(ax, "number of tasks T", ylabel, title or "cost vs number of tasks")
    return _finish(fig, path)


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centered moving mean of (N,) ``x`` over ``window`` <= N steps, shorter at the ends,
    over the finite values only (NaN where a window has none)."""
    if window <= 1:
        return x
    kernel = np.ones(window)
    finite = np.isfinite(x)
    count = np.convolve(finite.astype(float), kernel, mode="same")
    total = np.convolve(np.where(finite, x, 0.0), kernel, mode="same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def affinity_over_steps(steps, affinities, *, pairs: Sequence[tuple[int, int]] = (),
                        task_names: Sequence[str] | None = None,
                        groups: Sequence[Sequence[int]] | None = None, window: int = 1,
                        path: str | os.PathLike | None = None, title: str | None = None,
                        ax: Axes | None = None) -> Figure:
    """Per-step affinity curves over training.

    Args:
      steps: (N,) step numbers of the measured steps.
      affinities: (N, T, T) one matrix per measured step (``metrics["affinity"]`` of a train
        step with ``affinity=...``).
      pairs: (source, target) pairs drawn as their own curves.
      task_names: T names for the pair labels (default: indices).
      groups: draw the mean affinity within groups (ordered pairs i != j of one group) and
        between groups (pairs sharing no group).
      window: moving-average window over steps (1: raw).
      path: write the figure here as a PNG.
      title: axes title.
      ax: draw into this axes instead of a new figure.

    Returns:
      The figure.
    """
    z = np.asarray(affinities, dtype=np.float64)
    steps = np.asarray(steps)
    if z.ndim != 3 or z.shape[1] != z.shape[2] or z.shape[0] != len(steps):
        raise ValueError(f"affinities must be (N, T, T) with N = len(steps) = {len(steps)}; "
                         f"got shape {z.shape}.")
    t = z.shape[1]
    names = list(task_names) if task_names is not None else [str(i) for i in range(t)]
    if not pairs and not groups:
        raise ValueError("affinity_over_steps needs pairs=[(source, target), ...] or groups.")
    if not 1 <= window <= len(steps):
        raise ValueError(f"window={window} must be in [1, {len(steps)}], the number of steps.")
    fig, ax = _axes(ax, (6.0, 3.6))
    if groups:
        member = np.zeros((len(groups), t), bool)
        for g, members in enumerate(_check_groups(groups, t)):
            member[g, members] = True
        same = (member.T.astype(int) @ member.astype(int)) > 0
        off = ~np.eye(t, dtype=bool)
        for label, cells, style in (("within groups", same & off, "-"),
                                    ("between groups", ~same & off, "--")):
            if cells.any():  # NaN entries (a task without labels on that step) are skipped
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps stay NaN
                    mean = np.nanmean(z[:, cells], axis=1)
                ax.plot(steps, _moving_average(mean, window), style, linewidth=2.5,
                        label=label)
    for i, j in pairs:
        ax.plot(steps, _moving_average(z[:, i, j], window), linewidth=1, alpha=0.8,
                label=f"{names[i]} → {names[j]}")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _label(ax, "step", "affinity" + (f" ({window}-step mean)" if window > 1 else ""),
           title or "affinity over training")
    return _finish(fig, path)

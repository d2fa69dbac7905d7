"""Figures: PNGs are written, pixels follow the data, axes carry what they claim."""
import json

import matplotlib.image
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.patches import Rectangle

from tr_jax import plots

NAMES = ("a", "b", "c", "d", "e")


def _matrix():
    """Off-diagonal entries in (-1, 1) except a known maximum 3.0 at (source 3, target 1)
    and a known minimum -3.0 at (source 0, target 4); a huge diagonal."""
    z = np.random.default_rng(0).uniform(-1, 1, (5, 5))
    np.fill_diagonal(z, 50.0)
    z[3, 1], z[0, 4] = 3.0, -3.0
    return z


def _pixel(fig, image, ax, x, y):
    """RGB of ``image`` (read back from the PNG) at data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - py)), int(round(px)), :3]


def _rgb(color):
    return np.asarray(color[:3])


def test_heatmap_pixels_follow_the_matrix_orientation_and_group_order(tmp_path):
    z, path = _matrix(), tmp_path / "sub" / "heat.png"
    groups = ((4, 1), (2, 0))
    fig = plots.affinity_heatmap(z, NAMES, groups=groups, path=path, annotate=False)
    image = matplotlib.image.imread(path)
    ax = fig.axes[0]
    assert image.shape[:2] == (round(fig.get_figheight() * fig.dpi),
                               round(fig.get_figwidth() * fig.dpi))
    # groups in order, members ascending, ungrouped tasks last: b e a c d
    order = [1, 4, 0, 2, 3]
    assert [t.get_text() for t in ax.get_yticklabels()] == [NAMES[i] for i in order]
    assert [t.get_text() for t in ax.get_xticklabels()] == [NAMES[i] for i in order]
    assert ax.get_ylabel() == "source i" and ax.get_xlabel() == "target j"
    pos = {task: p for p, task in enumerate(order)}
    cmap = colormaps["RdBu_r"]
    # row = source, column = target; the symmetric scale ignores the diagonal
    np.testing.assert_allclose(_pixel(fig, image, ax, pos[1], pos[3]), _rgb(cmap(1.0)), atol=0.02)
    np.testing.assert_allclose(_pixel(fig, image, ax, pos[4], pos[0]), _rgb(cmap(0.0)), atol=0.02)
    # the transposed cell has an ordinary value: not the extreme colour
    assert np.abs(_pixel(fig, image, ax, pos[3], pos[1]) - _rgb(cmap(1.0))).max() > 0.1
    # the diagonal is grey (left out of the scale)
    np.testing.assert_allclose(_pixel(fig, image, ax, pos[2], pos[2]), [0.85] * 3, atol=0.02)
    # one outline per group, covering exactly its block of the reordered matrix
    boxes = sorted((r.get_x(), r.get_y(), r.get_width(), r.get_height())
                   for r in ax.patches if isinstance(r, Rectangle))
    assert boxes == [(-0.5, -0.5, 2, 2), (1.5, 1.5, 2, 2)]


def test_overlapping_groups_are_outlined_cell_block_by_cell_block():
    z = _matrix()
    # task 0 is in both groups: group 1 = {0, 3} is split (0 sits in group 0's block)
    fig = plots.affinity_heatmap(z, NAMES, groups=((0, 1), (0, 3)))
    ax = fig.axes[0]
    order = [0, 1, 3, 2, 4]
    assert [t.get_text() for t in ax.get_yticklabels()] == [NAMES[i] for i in order]
    rects = [r for r in ax.patches if isinstance(r, Rectangle)]
    covered = set()
    for r in rects[1:]:  # group 1's rectangles
        x0, y0 = int(r.get_x() + 0.5), int(r.get_y() + 0.5)
        covered |= {(y, x) for y in range(y0, y0 + int(r.get_height()))
                    for x in range(x0, x0 + int(r.get_width()))}
    # positions of tasks 0 and 3 are 0 and 2: their 2x2 cells, nothing else
    assert covered == {(0, 0), (0, 2), (2, 0), (2, 2)}
    assert len(ax.get_legend().get_texts()) == 2


def test_heatmap_annotations_and_bad_inputs():
    z = _matrix()
    fig = plots.affinity_heatmap(z, NAMES, show_diagonal=True)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 25 and "50" in texts and "3" in texts  # vmax 50: no decimals
    texts = [t.get_text() for t in plots.affinity_heatmap(0.04 * z, NAMES).axes[0].texts]
    assert len(texts) == 20 and "0.12" in texts and "-0.12" in texts  # vmax 0.12: 2 decimals
    tiny = np.array([[0.0, -1e-4], [1.0, 0.0]])
    assert [t.get_text() for t in plots.affinity_heatmap(tiny, NAMES[:2]).axes[0].texts] == \
        ["0.0", "1.0"]  # no "-0.0"
    with pytest.raises(ValueError, match="square"):
        plots.affinity_heatmap(np.zeros((2, 3)), NAMES[:2])
    with pytest.raises(ValueError, match="task_names"):
        plots.affinity_heatmap(z, NAMES[:4])
    with pytest.raises(ValueError, match="groups"):
        plots.affinity_heatmap(z, NAMES, groups=((0, 5),))


def test_heatmap_at_312_tasks_stays_small_and_unlabelled(tmp_path):
    t = 312
    z = np.random.default_rng(1).normal(size=(t, t))
    names = [f"has_attribute_{i}" for i in range(t)]
    groups = [tuple(range(i, t, 4)) for i in range(4)]
    fig = plots.affinity_heatmap(z, names, groups=groups, path=tmp_path / "big.png")
    height, width = matplotlib.image.imread(tmp_path / "big.png").shape[:2]
    assert width < 1400 and height < 1400
    ax = fig.axes[0]
    assert not [t.get_text() for t in ax.get_xticklabels() if t.get_text() in names]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 4 and legend[0].endswith("(78 tasks)")


def test_group_order():
    np.testing.assert_array_equal(plots.group_order(((3, 1), (1, 4)), 6), [1, 3, 4, 0, 2, 5])
    np.testing.assert_array_equal(plots.group_order((), 3), [0, 1, 2])


def test_mask_matrix_pixels_are_black_where_a_task_uses_a_unit(tmp_path):
    masks = np.zeros((3, 8))
    masks[0, :2] = masks[1, 2:5] = masks[2] = 1
    path = tmp_path / "m.png"
    fig = plots.mask_matrix(masks, ("x", "y", "z"), path)
    image = matplotlib.image.imread(path)
    ax = fig.axes[0]
    for (task, unit), used in np.ndenumerate(masks):
        np.testing.assert_allclose(_pixel(fig, image, ax, unit, task), [1 - used] * 3, atol=0.02)
    assert "keeps 54%" in ax.get_title()  # 13 of 24
    # sorted (stable): units used by 2 tasks (0..4) before those used by 1 (5..7)
    fig = plots.mask_matrix(masks, sort_units=True)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array()[:, 0], [1, 0, 1])


def test_accuracy_vs_sharing_lines_skip_missing_points_and_band_repeats(tmp_path):
    path = tmp_path / "acc.png"
    s = [0.0, 0.5, 1.0]
    reps = np.array([[0.6, 0.8], [0.7, 0.9], [0.75, 0.75]])
    fig = plots.accuracy_vs_sharing(s, {"random": [np.nan, 0.8, 0.9], "partition": reps}, path)
    assert path.stat().st_size > 5000
    ax = fig.axes[0]
    random, partition = ax.lines
    np.testing.assert_allclose(random.get_xdata(), [0.5, 1.0])
    np.testing.assert_allclose(random.get_ydata(), [0.8, 0.9])
    np.testing.assert_allclose(partition.get_ydata(), [0.7, 0.8, 0.75])
    assert len(ax.collections) == 1  # min..max band for the repeated scheme only
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["random", "partition"]
    with pytest.raises(ValueError, match="shape"):
        plots.accuracy_vs_sharing(s, {"random": [0.1, 0.2]})


def test_cost_vs_tasks_is_log_log(tmp_path):
    path = tmp_path / "cost.png"
    fig = plots.cost_vs_tasks([9, 40, 312], {"tag": [0.1, 0.5, 4.0], "cs": [0.05, np.nan, 1.0]},
                              path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.std() > 0.05  # not blank
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [9, 312])
    with pytest.raises(ValueError, match="positive"):
        plots.cost_vs_tasks([0, 1], {"tag": [1, 2]})


def test_affinity_over_steps_within_and_between_group_means():
    z = np.zeros((4, 3, 3))
    z[:, 0, 1] = z[:, 1, 0] = 1.0  # within group {0, 1}
    z[:, 2, 0] = -2.0              # between groups
    fig = plots.affinity_over_steps(np.arange(4), z, groups=((0, 1), (2,)), pairs=[(2, 0)],
                                    task_names=("p", "q", "r"))
    within, between, pair = fig.axes[0].lines[:3]
    np.testing.assert_allclose(within.get_ydata(), 1.0)
    # between: ordered pairs (0,2) (1,2) (2,0) (2,1) -> mean -0.5
    np.testing.assert_allclose(between.get_ydata(), -0.5)
    np.testing.assert_allclose(pair.get_ydata(), -2.0)
    assert pair.get_label() == "r → p"
    with pytest.raises(ValueError, match="pairs"):
        plots.affinity_over_steps(np.arange(4), z)
    with pytest.raises(ValueError, match="window=5 must be in \\[1, 4\\]"):
        plots.affinity_over_steps(np.arange(4), z, groups=((0, 1),), window=5)


def test_affinity_over_steps_skips_the_diagonal_and_unmeasured_entries():
    # Task 2 is in no group: its self-affinity is not a "between groups" pair. On step 1 task
    # 1 had no label (NaN row and column): that step's means use the entries measured.
    z = np.zeros((3, 3, 3))
    z[:, 2, 2] = 100.0
    z[:, 0, 2] = 3.0
    z[1, 1, :] = z[1, :, 1] = np.nan
    fig = plots.affinity_over_steps(np.arange(3), z, groups=((0, 1),))
    within, between = fig.axes[0].lines[:2]
    np.testing.assert_allclose(within.get_ydata(), [0.0, np.nan, 0.0])
    np.testing.assert_allclose(between.get_ydata(), [0.75, 1.5, 0.75])
    # The moving mean averages the finite values of each window.
    fig = plots.affinity_over_steps(np.arange(3), z, pairs=[(1, 0)], window=3)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [0.0, 0.0, 0.0])
    z[:, 1, 0] = [1.0, np.nan, 3.0]
    fig = plots.affinity_over_steps(np.arange(3), z, pairs=[(1, 0)], window=3)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [1.0, 2.0, 3.0])


def test_runs_write_the_affinity_heatmap_next_to_their_results(tmp_path):
    from tr_jax import experiment

    z = _matrix()
    experiment.save_affinity(str(tmp_path), z, NAMES)
    image = matplotlib.image.imread(tmp_path / "affinity.png")
    assert image.shape[0] > 300 and image.std() > 0.05
    np.testing.assert_array_equal(np.load(tmp_path / "affinity.npy"), z)
    # A pair never measured (NaN) is null in the JSON, which stays strict.
    z[0, 1] = np.nan
    experiment.save_affinity(str(tmp_path), z, NAMES)
    saved = json.loads((tmp_path / "affinity.json").read_text(), parse_constant=pytest.fail)
    assert saved["matrix"][0][1] is None and saved["matrix"][1][0] == z[1, 0]

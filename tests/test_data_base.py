"""tr_jax.data.base: ArrayDataset.batches' arguments and task_subset (the rules of
resolve_tasks, and planted groups that follow the kept columns)."""
import numpy as np
import pytest

from tr_jax.data import ArrayDataset, pipeline, resolve_tasks, task_subset

NAMES = ("a", "b", "c", "d", "e")


def make_dataset(groups=((0, 3), (1, 2, 4))):
    """5 tasks whose label column j holds j in every row, so a subset shows its columns."""
    labels = np.tile(np.arange(len(NAMES), dtype=np.int32), (6, 1))
    split = {"image": np.zeros((6, 2), np.float32), "labels": labels,
             "label_mask": labels % 2 == 0}
    return ArrayDataset("toy", NAMES, {"train": split}, groups=groups)


def test_resolve_tasks_is_importable_from_the_pipeline_too():
    assert pipeline.resolve_tasks is resolve_tasks


def test_task_subset_keeps_the_chosen_columns_in_order():
    small = task_subset(make_dataset(), ["d", 1, "a"])
    assert small.task_names == ("d", "b", "a")
    np.testing.assert_array_equal(small.splits["train"]["labels"][0], [3, 1, 0])
    np.testing.assert_array_equal(small.splits["train"]["label_mask"][0], [False, False, True])
    assert task_subset(make_dataset(), 2).task_names == ("a", "b")
    assert task_subset(make_dataset(), None).task_names == NAMES


@pytest.mark.parametrize("tasks, error, message", [
    (["a", "a"], ValueError, "without repeats"),
    ([], ValueError, "non-empty"),
    ("ab", TypeError, r"write tasks=\['ab'\]"),
    (["z"], KeyError, "unknown task 'z'"),
    ([5], KeyError, r"outside \[0, 5\)"),
    (6, ValueError, r"tasks=6 must be in \[1, 5\]"),
])
def test_task_subset_rejects_what_resolve_tasks_rejects(tasks, error, message):
    with pytest.raises(error, match=message):
        task_subset(make_dataset(), tasks)


def test_task_subset_renumbers_planted_groups_and_drops_emptied_ones():
    assert task_subset(make_dataset(), ["e", "a", "c", "d"]).groups == ((1, 3), (0, 2))
    assert task_subset(make_dataset(), ["c", "b"]).groups == ((0, 1),)
    assert task_subset(make_dataset(groups=None), ["c", "b"]).groups is None


def test_batches_reject_a_negative_start():
    dataset = make_dataset()
    with pytest.raises(ValueError, match="start=-1 must be >= 0"):
        next(dataset.batches("train", 2, start=-1))
    assert len(list(dataset.batches("train", 2, start=2))) == 1

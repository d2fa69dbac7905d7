"""Per-task losses and label masks against a plain numpy reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from tr_jax import losses


def _np_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_per_task_losses_match_numpy_and_ignore_missing_labels():
    r = np.random.default_rng(0)
    logits = r.normal(size=(6, 4, 3)).astype(np.float32)
    labels = r.integers(0, 3, (6, 4))
    mask = r.random((6, 4)) > 0.3
    mask[:, 2] = False  # task 2 has no label in this batch
    got = losses.per_task_losses(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    ce = _np_ce(logits, labels)
    for t in range(4):
        want = ce[mask[:, t], t].mean() if mask[:, t].any() else 0.0
        np.testing.assert_allclose(got[t], want, rtol=1e-5)
    # a missing label counts nowhere: changing it changes nothing
    labels2 = labels.copy()
    labels2[~mask] = (labels2[~mask] + 1) % 3
    np.testing.assert_allclose(losses.per_task_losses(logits, labels2, mask), got, rtol=1e-6)


def test_routed_losses_per_example_and_scalar_task():
    r = np.random.default_rng(1)
    logits = r.normal(size=(5, 2)).astype(np.float32)
    labels = r.integers(0, 2, (5, 3))
    ids = np.array([0, 2, 2, 1, 0])
    total, per_task = losses.routed_losses(logits, labels, ids, 3)
    ce = _np_ce(logits, labels[np.arange(5), ids])
    np.testing.assert_allclose(total, ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(per_task, [ce[ids == t].mean() for t in range(3)], rtol=1e-5)
    total1, per1 = losses.routed_losses(logits, labels, 1, 3)
    np.testing.assert_allclose(total1, _np_ce(logits, labels[:, 1]).mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per1)[[0, 2]], 0.0)


def test_mismatched_label_shape_is_an_error():
    with pytest.raises(ValueError, match=r"labels must have shape \(6, 4\)"):
        losses.per_task_losses(jnp.zeros((6, 4, 2)), jnp.zeros((6, 3), int))
    with pytest.raises(ValueError, match="label_mask"):
        losses.per_task_losses(jnp.zeros((6, 4, 2)), jnp.zeros((6, 4), int), jnp.ones((6,)))


def test_labelled_tasks_all_tasks_and_routed():
    labels = np.zeros((4, 3), np.int32)
    mask = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 0]], bool)
    np.testing.assert_array_equal(losses.labelled_tasks(labels), [True] * 3)
    np.testing.assert_array_equal(losses.labelled_tasks(labels, mask), [True, False, True])
    # Routed: example b counts for task[b] only, if it has that label.
    ids = np.array([0, 2, 1, 1])
    np.testing.assert_array_equal(losses.labelled_tasks(labels, None, ids), [True, True, True])
    np.testing.assert_array_equal(losses.labelled_tasks(labels, mask, ids), [True, False, True])
    np.testing.assert_array_equal(losses.labelled_tasks(labels, mask, 1), [False] * 3)

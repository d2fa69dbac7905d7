"""Tests for tr_jax.data.synthetic: planted task groups that TAG can find."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import models
from tr_jax.affinity import lookahead_affinity, merge_params, optax_lookahead, split_params
from tr_jax.data.synthetic import load_synthetic


def group_masks(groups, num_tasks):
    same = np.zeros((num_tasks, num_tasks), bool)
    for g in groups:
        same[np.ix_(g, g)] = True
    off_diagonal = ~np.eye(num_tasks, dtype=bool)
    return same & off_diagonal, ~same


def test_shapes_groups_and_names():
    ds = load_synthetic(num_groups=4, tasks_per_group=3, dim=16, num_train=300, num_test=100)
    train, test = ds.splits["train"], ds.splits["test"]
    assert train["image"].shape == (300, 16) and train["image"].dtype == np.float32
    assert train["labels"].shape == (300, 12) and train["labels"].dtype == np.int32
    assert test["labels"].shape == (100, 12) and train["label_mask"].all()
    assert sorted(t for g in ds.groups for t in g) == list(range(12))
    assert len(ds.groups) == 4 and all(len(g) == 3 for g in ds.groups)
    assert ds.groups != ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))   # ids are shuffled
    for g in ds.groups:             # a group's tasks carry the same "g<k>" name prefix
        assert len({ds.task_names[t].split("_")[0] for t in g}) == 1
    positive = train["labels"].mean(0)
    assert ((positive > 0.1) & (positive < 0.9)).all()


def test_deterministic_in_seed():
    a, b, c = load_synthetic(seed=3), load_synthetic(seed=3), load_synthetic(seed=4)
    for split in ("train", "test"):
        for key in ("image", "labels"):
            np.testing.assert_array_equal(a.splits[split][key], b.splits[split][key])
    assert a.groups == b.groups and a.task_names == b.task_names
    assert not np.array_equal(a.splits["train"]["labels"], c.splits["train"]["labels"])


def test_labels_agree_within_groups_not_across():
    ds = load_synthetic(seed=0)
    labels = ds.splits["train"]["labels"] * 2.0 - 1.0
    corr = np.abs(np.corrcoef(labels.T))
    within, across = group_masks(ds.groups, ds.num_tasks)
    assert corr[within].min() > 0.5
    assert corr[across].max() < 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim=4 is too small"):
        load_synthetic(num_groups=3, factors=2, dim=4)
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        load_synthetic(num_groups=0)


def test_tag_affinity_finds_the_planted_groups():
    """A short TAG run (small MLP, SGD momentum, optimizer lookahead every step): the mean
    affinity between tasks of a planted group exceeds the mean across groups."""
    ds = load_synthetic(seed=0, num_train=1024)
    model = models.MLP(num_tasks=ds.num_tasks, hidden=(32,))
    params = model.init(jax.random.key(0), ds.splits["train"]["image"][:2], None)["params"]
    lr = 0.1
    tx = optax.sgd(lr, momentum=0.9)

    def loss_fn(shared, rest, batch):
        logits = model.apply({"params": merge_params(shared, rest)}, batch["image"], None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(0)

    @jax.jit
    def step(params, opt_state, batch):
        shared, rest = split_params(params)
        z = lookahead_affinity(loss_fn, shared, rest, batch, lr=lr,
                               update_fn=optax_lookahead(tx, opt_state, shared, rest))
        grads = jax.grad(lambda p: loss_fn(*split_params(p), batch).sum())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, z

    opt_state, total = tx.init(params), jnp.zeros((ds.num_tasks, ds.num_tasks))
    for epoch in range(2):
        for batch in ds.batches("train", 64, epoch=epoch):
            params, opt_state, z = step(params, opt_state, batch)
            total = total + z
    within, across = group_masks(ds.groups, ds.num_tasks)
    mean = np.asarray(total) / (2 * 16)
    assert mean[within].mean() > mean[across].mean() + 0.05, (mean[within].mean(),
                                                               mean[across].mean())

"""Train state, train/eval steps and the digits quickstart."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import experiment, models, train
from tr_jax.data import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _state(model, tx, batch, seed=0):
    return train.create_train_state(model, tx, jax.random.key(seed), batch)


def test_routing_masks_are_outside_params_and_optimizer_and_never_change(digits):
    model = models.SmallCNN(num_tasks=18, sharing=0.5, widths=(8, 16))
    tx = optax.adam(1e-2)
    batch = next(digits.batches("train", 32))
    state = _state(model, tx, batch)
    masks0 = jax.tree.map(np.array, state.routing)
    assert len(jax.tree.leaves(masks0)) == 2
    assert "routing" not in str(jax.tree_util.tree_structure(state.params))
    n_params = len(jax.tree.leaves(state.params))
    # adam keeps mu and nu per trainable leaf (+ count): nothing for the masks
    assert len(jax.tree.leaves(state.opt_state)) == 2 * n_params + 1
    step = train.make_train_step(model, tx, mode="per_example")
    for i, b in enumerate(digits.batches("train", 32)):
        if i == 5:
            break
        params_before = jax.tree.map(np.array, state.params)
        state, metrics = step(state, {**b, "task": np.arange(32, dtype=np.int32) % 18})
    assert int(state.step) == 5
    jax.tree.map(np.testing.assert_array_equal, state.routing, masks0)  # bit-identical
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, params_before)
    assert all(jax.tree.leaves(changed))
    # masks round-trip through the train state into the model's variables
    jax.tree.map(np.testing.assert_array_equal, state.variables["routing"], masks0)


@pytest.mark.parametrize("mode", train.MODES)
def test_train_step_decreases_the_loss_in_every_mode(digits, mode):
    model = models.MLP(num_tasks=18, sharing=0.5, hidden=(64,))
    tx = optax.adam(1e-2)
    batch = next(digits.batches("train", 64))
    batch = experiment.route_batch(batch, mode, 18, np.random.default_rng(0),
                                   np.arange(18), 3)
    train.check_batch(batch, 18, mode)
    state = _state(model, tx, batch)
    step = train.make_train_step(model, tx, mode=mode)
    first = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.7 * first
    assert metrics["task_losses"].shape == (18,)


def test_non_finite_loss_leaves_the_state_unchanged(digits):
    model = models.MLP(num_tasks=18, hidden=(8,))
    tx = optax.sgd(0.1)
    batch = next(digits.batches("train", 16))
    state = _state(model, tx, batch)
    before = jax.tree.map(np.array, state.params)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state, metrics = train.make_train_step(model, tx)(state, bad)
    assert not bool(metrics["finite"]) and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, before)


def test_eval_counts_match_a_numpy_reference(digits):
    model = models.MLP(num_tasks=18, sharing=0.5, hidden=(16,))
    batch = next(digits.batches("test", 100, shuffle=False))
    state = _state(model, optax.sgd(0.1), batch)
    r = train.evaluate(train.make_eval_step(model), state, [batch])
    logits, _ = models.apply_all_tasks(model, state.variables, jnp.asarray(batch["image"]))
    pred = np.asarray(logits).argmax(-1)
    y = batch["labels"]
    np.testing.assert_allclose(r["accuracy"], (pred == y).mean(0))
    tpr = [(pred[y[:, t] == 1, t] == 1).mean() for t in range(18)]
    tnr = [(pred[y[:, t] == 0, t] == 0).mean() for t in range(18)]
    np.testing.assert_allclose(r["balanced_accuracy"], (np.array(tpr) + np.array(tnr)) / 2)


def test_affinity_step_makes_the_same_update_as_the_plain_step(digits):
    model = models.MLP(num_tasks=18, hidden=(16,))
    tx = optax.sgd(0.05, momentum=0.9)
    batch = next(digits.batches("train", 32))
    plain = train.make_train_step(model, tx, jit=False)
    tag = train.make_train_step(model, tx, affinity="lookahead", lr=0.05, jit=False)
    s_plain, s_tag = _state(model, tx, batch), _state(model, tx, batch)
    for _ in range(2):
        s_plain, _ = plain(s_plain, batch)
        s_tag, metrics = tag(s_tag, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 s_plain.params, s_tag.params)
    assert int(s_tag.affinity_count) == 2 and metrics["affinity"].shape == (18, 18)
    np.testing.assert_allclose(train.mean_affinity(s_tag), s_tag.affinity_sum / 2)


def test_measuring_steps_reuse_the_task_gradients_for_the_same_update(digits):
    # The fused step (update gradient = sum of the per-task gradients the affinity pulled
    # back) against the unfused one (an explicit affinity_fn turns the reuse off), on a routed
    # conv net with BatchNorm: same parameters, running statistics and affinity.
    model = models.SmallCNN(num_tasks=18, sharing=0.5, widths=(4, 8))
    tx = optax.sgd(0.05, momentum=0.9)
    batch = next(digits.batches("train", 16))
    for name in train.FROM_TASK_GRADS:
        kw = dict(affinity=name, lr=0.05, lookahead="optimizer")
        fused = train.make_train_step(model, tx, **kw)
        apart = train.make_train_step(model, tx, affinity_fn=train.AFFINITIES[name], **kw)
        s_fused, s_apart = _state(model, tx, batch), _state(model, tx, batch)
        for _ in range(2):
            s_fused, m_fused = fused(s_fused, batch)
            s_apart, m_apart = apart(s_apart, batch)
        np.testing.assert_allclose(m_fused["loss"], m_apart["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_fused["grad_norm"], m_apart["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(s_fused.affinity_sum, s_apart.affinity_sum, rtol=1e-4,
                                   atol=4e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     (s_fused.params, s_fused.batch_stats), (s_apart.params, s_apart.batch_stats))


def test_periodic_affinity_on_the_host_equals_the_conditional_and_has_none(digits):
    # XLA:CPU runs gradient convolutions inside a conditional with slow generic kernels, so on
    # CPU the measuring steps are chosen on the host (two compiled steps, neither with a
    # lax.cond); "cond" keeps one traceable step. Both measure the same steps and values.
    model = models.MLP(num_tasks=18, hidden=(16,))
    tx = optax.sgd(0.05, momentum=0.9)
    batch = next(digits.batches("train", 32))
    kw = dict(affinity="lookahead", lr=0.05, affinity_every=3)
    host = train.make_train_step(model, tx, **kw)   # "auto" is "host" on CPU
    cond = train.make_train_step(model, tx, affinity_dispatch="cond", **kw)
    assert isinstance(host, train.PeriodicStep) and host.every == 3
    state = _state(model, tx, batch)
    has_case = lambda step: "stablehlo.case" in step.lower(state, batch).as_text()
    assert not has_case(host.measure) and not has_case(host.skip) and has_case(cond)
    every_step = train.make_train_step(model, tx, affinity="lookahead", lr=0.05)
    assert not has_case(every_step)
    s_host, s_cond, measured = _state(model, tx, batch), _state(model, tx, batch), []
    for _ in range(4):
        s_host, m_host = host(s_host, batch)
        s_cond, m_cond = cond(s_cond, batch)
        measured.append(bool(m_host["affinity_measured"]))
        assert bool(m_cond["affinity_measured"]) == measured[-1]
        np.testing.assert_allclose(m_host["affinity"], m_cond["affinity"], rtol=1e-4, atol=2e-5)
    assert measured == [True, False, False, True] and int(s_host.affinity_count) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 s_host.params, s_cond.params)
    compiled = host.lower(state, batch).compile()
    assert isinstance(compiled, train.PeriodicStep) and compiled.memory_analysis() is not None
    traced = train.make_train_step(model, tx, affinity_dispatch="host", jit=False, **kw)
    with pytest.raises(TypeError, match="affinity_dispatch='cond'"):
        jax.jit(traced)(state, batch)


def test_bad_batches_and_options_are_clear_errors(digits):
    batch = next(digits.batches("train", 8))
    with pytest.raises(ValueError, match=r"labels'\] must have shape \(B, T\) = \(8, 18\)"):
        train.check_batch({**batch, "labels": batch["labels"][:, :3]}, 18, "all_tasks")
    with pytest.raises(KeyError, match="task"):
        train.check_batch(batch, 18, "per_example")
    with pytest.raises(ValueError, match=r"\[0, 18\)"):
        train.check_batch({**batch, "task": np.full(8, 18, np.int32)}, 18, "per_example")
    model = models.MLP(num_tasks=18)
    with pytest.raises(ValueError, match="lr > 0"):
        train.make_train_step(model, optax.sgd(0.1), affinity="lookahead")
    with pytest.raises(ValueError, match="affinity='bogus'"):
        train.make_train_step(model, optax.sgd(0.1), affinity="bogus", lr=0.1)
    with pytest.raises(ValueError, match="affinity_dispatch='gpu'"):
        train.make_train_step(model, optax.sgd(0.1), affinity="lookahead", lr=0.1,
                              affinity_every=2, affinity_dispatch="gpu")


def test_quickstart_config_reaches_the_measured_accuracy_floor(tmp_path):
    """The digits quickstart (routed SmallCNN, σ = 0.5, per-example routing, 12 epochs).

    Measured on this project's 2-core CPU: mean accuracy 0.939, mean balanced accuracy 0.853
    (seed 0). Majority-class baselines are 0.756 and 0.5. Floors leave room for float
    nondeterminism across machines, not for a broken model.
    """
    from tr_jax.cli import DEFAULT_CONFIG, load_config

    config = load_config(str(DEFAULT_CONFIG), ["--config.progress=False"])
    result = experiment.train_and_evaluate(config, str(tmp_path))
    assert result["mean_accuracy"] >= 0.89
    assert result["mean_balanced_accuracy"] >= 0.78
    assert (tmp_path / "results.json").exists() and (tmp_path / "metrics.jsonl").exists()

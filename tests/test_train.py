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


def test_a_non_finite_step_leaves_the_affinity_sum_unchanged(digits):
    model = models.MLP(num_tasks=18, hidden=(8,))
    tx = optax.sgd(0.1)
    batch = next(digits.batches("train", 16))
    state = _state(model, tx, batch)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state, metrics = train.make_train_step(model, tx, affinity="lookahead", lr=0.1)(state, bad)
    assert not bool(metrics["finite"]) and int(state.step) == 0
    assert not state.affinity_count.any() and not state.affinity_sum.any()
    # A lookahead that overflows (lr = 1e38) leaves its entries out and the update as it is.
    state, metrics = train.make_train_step(model, tx, affinity="lookahead", lr=1e38)(state,
                                                                                      batch)
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert not np.isfinite(metrics["affinity"]).all()
    np.testing.assert_array_equal(state.affinity_count, np.isfinite(metrics["affinity"]))
    assert np.isfinite(state.affinity_sum).all()


def test_affinity_leaves_out_tasks_without_a_label_in_the_batch(digits):
    # Task 2 unlabelled: its loss is 0, so Z's column 2 would be 0 / 0 and its row a step of
    # size 0. Those entries are not measured; every other entry is what the fully labelled
    # batch gives (source i's lookahead and target j's loss do not involve task 2).
    model = models.MLP(num_tasks=18, hidden=(16,))
    tx = optax.sgd(0.05)
    batch = next(digits.batches("train", 32))
    mask = np.ones_like(batch["labels"], bool)
    mask[:, 2] = False
    step = train.make_train_step(model, tx, affinity="lookahead", lr=0.05)
    s_full, m_full = step(_state(model, tx, batch), {**batch, "label_mask": mask | True})
    s_part, m_part = step(_state(model, tx, batch), {**batch, "label_mask": mask})
    other = np.ones((18, 18), bool)
    other[2, :] = other[:, 2] = False
    assert bool(m_part["finite"])
    assert np.isnan(m_part["affinity"])[~other].all()
    np.testing.assert_allclose(m_part["affinity"][other], m_full["affinity"][other], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(s_part.affinity_count, other.astype(np.int32))
    # A second step with task 2 labelled measures every entry: the mean is per entry.
    s_part, m_two = step(s_part, {**batch, "label_mask": mask | True})
    np.testing.assert_array_equal(s_part.affinity_count, 1 + other)
    mean = np.asarray(train.mean_affinity(s_part))
    # (The running sum and the metric are float32 values XLA may compute in separate fusions.)
    np.testing.assert_allclose(mean[~other], m_two["affinity"][~other], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean[other], (m_part["affinity"] + m_two["affinity"])[other] / 2,
                               rtol=1e-4, atol=1e-6)


def test_per_example_affinity_measures_the_tasks_routed_in_the_batch(digits):
    model = models.MLP(num_tasks=18, sharing=0.5, hidden=(16,))
    tx = optax.sgd(0.05)
    batch = next(digits.batches("train", 16))
    batch = {**batch, "task": (np.arange(16) % 12).astype(np.int32)}  # tasks 12..17 absent
    step = train.make_train_step(model, tx, mode="per_example", affinity="lookahead", lr=0.05,
                                 affinity_mode="per_example")
    state, metrics = step(_state(model, tx, batch), batch)
    present = np.arange(18) < 12
    both = present[:, None] & present[None, :]
    assert np.isfinite(metrics["affinity"][both]).all()
    assert np.isnan(metrics["affinity"][~both]).all()
    np.testing.assert_array_equal(state.affinity_count, both)


def test_affinity_normalizes_by_the_learning_rate_of_its_step(digits):
    # Under a schedule, step 1 runs at half the rate: Z is normalized by that rate, as a step
    # built with the constant rate 0.025 normalizes it.
    model = models.MLP(num_tasks=18, hidden=(16,))
    schedule = optax.exponential_decay(0.05, 1, 0.5, staircase=True)
    tx = optax.sgd(schedule, momentum=0.9)
    batch = next(digits.batches("train", 32))
    kwargs = {"affinity": "lookahead", "lookahead": "optimizer"}
    scheduled = train.make_train_step(model, tx, lr=schedule, **kwargs)
    state, _ = scheduled(_state(model, tx, batch), batch)
    _, got = scheduled(jax.tree.map(jnp.copy, state), batch)  # the step donates its state
    _, want = train.make_train_step(model, tx, lr=0.025, **kwargs)(state, batch)
    # Z = (1 - L_after / L_before) / lr: a float32 rounding of the loss ratio (~1e-7) becomes
    # ~1e-7 / 0.025 = 4e-6 of Z; normalizing by the wrong rate would be off by a factor of 2.
    np.testing.assert_allclose(got["affinity"], want["affinity"], rtol=1e-5, atol=2e-5)
    assert np.abs(want["affinity"]).max() > 0


def test_per_example_affinity_needs_a_task_per_example(digits):
    model = models.MLP(num_tasks=18, hidden=(8,))
    batch = next(digits.batches("train", 16))
    with pytest.raises(KeyError, match="affinity_mode='per_example' needs batch\\['task'\\]"):
        train.check_batch(batch, 18, "all_tasks", "per_example")
    with pytest.raises(ValueError, match="use affinity_mode='all_tasks'"):
        train.make_train_step(model, optax.sgd(0.1), mode="task_per_batch",
                              affinity="lookahead", lr=0.1, affinity_mode="per_example")
    routed = experiment.route_batch(batch, "per_example", 18, np.random.default_rng(0), None,
                                    0, balanced=True)
    assert np.bincount(routed["task"], minlength=18).min() == 0  # 16 examples < 18 tasks
    batch = next(digits.batches("train", 36))
    routed = experiment.route_batch(batch, "per_example", 18, np.random.default_rng(0), None,
                                    0, balanced=True)
    np.testing.assert_array_equal(np.bincount(routed["task"], minlength=18), 2)
    train.check_batch(routed, 18, "all_tasks", "per_example")


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


def test_summary_leaves_out_tasks_without_a_labelled_example():
    counts = {"correct": np.array([3.0, 0.0]), "count": np.array([4.0, 0.0]),
              "tp": np.array([1.0, 0.0]), "fn": np.array([1.0, 0.0]),
              "tn": np.array([2.0, 0.0]), "fp": np.array([0.0, 0.0])}
    r = train.summarize_counts(counts)
    np.testing.assert_array_equal(r["accuracy"], [0.75, np.nan])
    np.testing.assert_array_equal(r["balanced_accuracy"], [0.75, np.nan])
    assert r["mean_accuracy"] == 0.75 and r["mean_balanced_accuracy"] == 0.75


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
    assert (s_tag.affinity_count == 2).all() and metrics["affinity"].shape == (18, 18)
    np.testing.assert_allclose(train.mean_affinity(s_tag), s_tag.affinity_sum / 2)


def test_measuring_steps_reuse_the_task_gradients_for_the_same_update(digits):
    # The fused step (update gradient = sum of the per-task gradients the affinity pulled
    # back) against the unfused one (an explicit affinity_fn turns the reuse off), on a routed
    # conv net with BatchNorm: same parameters, running statistics and affinity. Six of the
    # digits tasks: the CPU step unrolls one backward pass per task, so compile time grows with T.
    model = models.SmallCNN(num_tasks=6, sharing=0.5, widths=(4, 8))
    tx = optax.sgd(0.05, momentum=0.9)
    batch = next(digits.batches("train", 16))
    batch = {k: v[:, :6] if k in ("labels", "label_mask") else v for k, v in batch.items()}
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
    assert measured == [True, False, False, True] and (s_host.affinity_count == 2).all()
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

"""Tests for tr_jax.affinity: per-task gradients, TAG lookahead affinity, gradient cosine.

References are independent of the code under test: a plain Python loop over tasks (grad of
task i's loss, move a copy of the shared parameters, re-evaluate every loss), optimizer
updates written out by hand, and a matrix computed by TensorFlow.

``tests/data/affinity_tf.npz`` was written by the TF2 peer anchor (TensorFlow 2.21, Keras
3.15) with ``python anchors/tag_tf.py --verify``: the TAG CelebA encoder (9 tasks, 64x64,
batch 16) with the numpy weights and batch of ``anchors/tag_common.py`` (``make_weights(9, 64)``,
``make_batch(16, 64, 9)``, both seed-deterministic), plain-SGD lookahead with lr = 5e-4 and
BatchNorm on batch statistics. Keys: z_float64, z_float32 (9, 9), loss_float64, loss_float32
(9,). :func:`tag_common_weights` below re-creates the same numpy recipe.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import models
from tr_jax.affinity import (gradient_cosine, lookahead_affinity, merge_params, optax_lookahead,
                             per_task_and_total_grads, per_task_grads, resolve_strategy,
                             split_params)

DATA = pathlib.Path(__file__).parent / "data"
LR = 0.05


def per_task_ce(logits, labels):
    """(B, T, K) logits, (B, T) labels -> (T,) mean softmax cross-entropy, written out."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return -picked.mean(axis=0)


def make_problem(kind: str, dtype=jnp.float64, num_tasks: int = 3, seed: int = 0):
    """(loss_fn, params, extra variables, batch) for a small MLP or a CNN with BatchNorm."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    if kind == "mlp":
        model = models.MLP(num_tasks=num_tasks, hidden=(12, 10))
        x = jax.random.normal(k1, (16, 7))
    else:
        model = models.SmallCNN(num_tasks=num_tasks, widths=(4, 6))
        x = jax.random.normal(k1, (8, 6, 6, 2))
    labels = jax.random.randint(k2, (x.shape[0], num_tasks), 0, 2)
    variables = jax.tree.map(lambda a: a.astype(dtype), model.init(k3, x[:2], None))
    params = variables.pop("params")
    batch = {"image": x.astype(dtype), "labels": labels}

    def loss_fn(shared, rest, b):
        logits, _ = model.apply({"params": merge_params(shared, rest["params"]),
                                 **rest["extra"]}, b["image"], None, True,
                                mutable=["batch_stats"])
        return per_task_ce(logits, b["labels"])

    return loss_fn, params, variables, batch


def shared_rest(params, extra):
    shared, rest = split_params(params, ("encoder",))
    return shared, {"params": rest, "extra": extra}


def loop_reference(loss_fn, shared, rest, batch, lr, delta_fn):
    """Z by a plain Python loop: for each task i, grad of L_i alone, move a copy, re-evaluate.
    (The loss and the one-task gradient are jitted only to keep the test fast.)"""
    losses = jax.jit(loss_fn)
    grad_one = jax.jit(lambda s, r, b, i: jax.grad(lambda s: loss_fn(s, r, b)[i])(s))
    before = np.asarray(losses(shared, rest, batch))
    rows = []
    for i in range(before.shape[0]):
        g = grad_one(shared, rest, batch, i)
        moved = jax.tree.map(lambda s, d: s - d, shared, delta_fn(g))
        rows.append((1.0 - np.asarray(losses(moved, rest, batch)) / before) / lr)
    return np.stack(rows)


def assert_close(a, b, rtol=1e-9, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def train_a_few_steps(tx, loss_fn, params, extra, batch, steps=3):
    """Real optimizer steps on the summed loss; returns params, opt state and the shared
    gradients of every step (for hand-written optimizer references)."""
    state = tx.init(params)
    history = []
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(*shared_rest(p, extra), b).sum()))
    for k in range(steps):
        grads = grad(params, dict(batch, labels=jnp.roll(batch["labels"], k, axis=0)))
        history.append(split_params(grads, ("encoder",))[0])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, history


# ---------------------------------------------------------------- per-task gradients

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_task_grads_match_one_grad_per_task(x64, kind):
    loss_fn, params, extra, batch = make_problem(kind)
    shared, rest = shared_rest(params, extra)
    losses, grads = jax.jit(per_task_grads, static_argnums=0)(loss_fn, shared, rest, batch)
    _, vmapped = jax.jit(lambda s, r, b: per_task_grads(loss_fn, s, r, b, strategy="vmap"))(
        shared, rest, batch)
    assert_close(losses, jax.jit(loss_fn)(shared, rest, batch))
    grad_one = jax.jit(lambda s, i: jax.grad(lambda s: loss_fn(s, rest, batch)[i])(s))
    for i in range(3):
        ref = grad_one(shared, i)
        for g, v, r in zip(jax.tree.leaves(grads), jax.tree.leaves(vmapped), jax.tree.leaves(ref)):
            assert g.shape == (3, *r.shape)
            assert_close(g[i], r, atol=1e-12)
            assert_close(v[i], r, atol=1e-12)


def test_per_task_and_total_grads_give_the_summed_gradient_and_aux(x64):
    model = models.SmallCNN(num_tasks=3, widths=(4, 6))
    _, params, extra, batch = make_problem("cnn")

    def losses_and_stats(shared, head, b):
        logits, updates = model.apply({"params": merge_params(shared, head), **extra},
                                      b["image"], None, True, mutable=["batch_stats"])
        return per_task_ce(logits, b["labels"]), updates["batch_stats"]

    shared, head = split_params(params)
    losses, grads, head_grad, stats = jax.jit(
        lambda s, h, b: per_task_and_total_grads(losses_and_stats, s, h, b, has_aux=True))(
        shared, head, batch)

    @jax.jit
    def reference(shared, head):
        summed = jax.grad(lambda s, h: losses_and_stats(s, h, batch)[0].sum(), argnums=(0, 1))
        task_1 = jax.grad(lambda s: losses_and_stats(s, head, batch)[0][1])
        return losses_and_stats(shared, head, batch), summed(shared, head), task_1(shared)

    (ref_losses, ref_stats), (ref_shared, ref_head), ref_task_1 = reference(shared, head)
    assert_close(losses, ref_losses)
    for got, ref in ((jax.tree.map(lambda g: g.sum(0), grads), ref_shared),
                     (head_grad, ref_head), (stats, ref_stats),
                     (jax.tree.map(lambda g: g[1], grads), ref_task_1)):
        jax.tree.map(lambda a, b: assert_close(a, b, atol=1e-12), got, ref)


def test_unrolled_backward_passes_reuse_memory():
    """XLA's temporary memory for unrolled per-task backward passes does not grow with T (the
    tasks are sequenced; unsequenced, XLA:CPU kept ~2 activations per task alive)."""
    activation = 32 * 32 * 32 * 16 * 4          # bytes of one (B, H, W, C) float32 map

    def temp_bytes(num_tasks):
        model = models.SmallCNN(num_tasks=num_tasks, widths=(16,))
        x, y = jnp.zeros((32, 32, 32, 3)), jnp.zeros((32, num_tasks), jnp.int32)
        variables = model.init(jax.random.key(0), x[:2], None)
        shared, rest = split_params(variables["params"])

        def loss_fn(s, r, b):
            logits, _ = model.apply({"params": merge_params(s, r),
                                     "batch_stats": variables["batch_stats"]},
                                    b[0], None, True, mutable=["batch_stats"])
            return per_task_ce(logits, b[1])

        fn = jax.jit(lambda s, r, b: per_task_grads(loss_fn, s, r, b, strategy="unrolled"))
        return fn.lower(shared, rest, (x, y)).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(8) - temp_bytes(2) < activation


@pytest.mark.parametrize("has_aux", [False, True])
def test_many_unrolled_backward_passes_skip_winograd(monkeypatch, has_aux):
    """Up to UNROLLED_WINOGRAD_MAX_TASKS unrolled per-task backward passes keep the Winograd
    lowering; more trace XLA's convolutions (compiling T copies of the transforms was slow and
    large); the gradients are the same either way."""
    from tr_jax.affinity import per_task
    from tr_jax.nn import conv as conv_lib

    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    c = conv_lib.WINOGRAD_MIN_CIN
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, c))
    shared = {"k": 0.05 * jax.random.normal(jax.random.key(1), (3, 3, c, 4))}

    def loss_fn(s, r, b):
        per_channel = jnp.mean(jnp.tanh(conv_lib.conv2d(b, s["k"])) ** 2, axis=(0, 1, 2))
        losses = per_channel[jnp.arange(r.shape[0]) % 4] * r
        return (losses, losses.sum()) if has_aux else losses

    def grads(num_tasks):
        rest = jnp.linspace(0.5, 1.5, num_tasks)
        fn = lambda s: per_task_and_total_grads(loss_fn, s, rest, x, has_aux=has_aux)[1]  # noqa: E731
        return str(jax.make_jaxpr(fn)(shared)), fn(shared)

    for num_tasks in (per_task.UNROLLED_WINOGRAD_MAX_TASKS, per_task.UNROLLED_WINOGRAD_MAX_TASKS + 1):
        jaxpr, got = grads(num_tasks)
        skipped = num_tasks > per_task.UNROLLED_WINOGRAD_MAX_TASKS
        assert ("conv_general_dilated" in jaxpr) == skipped, num_tasks
        with conv_lib.skip_winograd():   # XLA's convolutions, each task's gradient alone
            rest = jnp.linspace(0.5, 1.5, num_tasks)
            ref = [jax.grad(lambda s, i=i: (loss_fn(s, rest, x)[0] if has_aux
                                            else loss_fn(s, rest, x))[i])(shared)["k"]
                   for i in (0, num_tasks - 1)]
        assert_close(got["k"][0], ref[0], atol=1e-6)
        assert_close(got["k"][-1], ref[1], atol=1e-6)


def test_split_and_merge_params_round_trip():
    params = {"encoder": {"a": {"kernel": np.ones((2, 3))}, "b": np.zeros(2)},
              "head": {"kernel": np.ones((3, 2, 2))}}
    shared, rest = split_params(params, ("encoder",))
    assert set(shared) == {"encoder"} and set(rest) == {"head"}
    assert jax.tree.all(jax.tree.map(np.array_equal, merge_params(shared, rest), params))
    by_prefix, _ = split_params(params, [("encoder", "a")])
    by_predicate, _ = split_params(params, lambda path: path[-1] == "kernel")
    assert jax.tree.structure(by_prefix) == jax.tree.structure({"encoder": {"a": {"kernel": 0}}})
    assert len(jax.tree.leaves(by_predicate)) == 2
    with pytest.raises(ValueError, match="selected no shared leaves"):
        split_params(params, ("decoder",))
    with pytest.raises(ValueError, match="both hold"):
        merge_params(shared, shared)


# ---------------------------------------------------------------- lookahead affinity

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sgd_lookahead_matches_python_loop_for_every_strategy(x64, kind):
    loss_fn, params, extra, batch = make_problem(kind)
    shared, rest = shared_rest(params, extra)
    ref = loop_reference(loss_fn, shared, rest, batch, LR,
                         lambda g: jax.tree.map(lambda a: LR * a, g))
    assert np.abs(ref).max() > 1e-2     # not a degenerate all-zero case
    cases = [("vmap", None), ("unrolled", None), ("chunked", 2)]
    if kind == "mlp":
        cases += [("chunked", 1), ("auto", None)]
    for strategy, chunk in cases:
        def affinity(s, r, b, strategy=strategy, chunk=chunk):
            return lookahead_affinity(loss_fn, s, r, b, lr=LR, strategy=strategy, chunk_size=chunk)
        assert_close(jax.jit(affinity)(shared, rest, batch), ref)
    if kind == "mlp":
        assert_close(affinity(shared, rest, batch), ref)     # eager == jitted


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_momentum_lookahead_matches_hand_written_update(x64, kind):
    loss_fn, params, extra, batch = make_problem(kind)
    tx = optax.sgd(LR, momentum=0.9)
    params, state, history = train_a_few_steps(tx, loss_fn, params, extra, batch)
    buf = jax.tree.map(jnp.zeros_like, history[0])
    for g in history:                                   # optax trace: buf <- g + m * buf
        buf = jax.tree.map(lambda b, g: g + 0.9 * b, buf, g)
    assert max(float(jnp.abs(b).max()) for b in jax.tree.leaves(buf)) > 0
    shared, rest = shared_rest(params, extra)
    ref = loop_reference(loss_fn, shared, rest, batch, LR,
                         lambda g: jax.tree.map(lambda g, b: LR * (g + 0.9 * b), g, buf))
    update_fn = optax_lookahead(tx, state, shared, rest["params"])
    got = jax.jit(lambda s, r, b: lookahead_affinity(loss_fn, s, r, b, lr=LR,
                                                     update_fn=update_fn))(shared, rest, batch)
    assert_close(got, ref)
    plain = lookahead_affinity(loss_fn, shared, rest, batch, lr=LR)
    assert np.abs(np.asarray(plain) - ref).max() > 1e-3    # momentum really changes Z


def test_momentum_lookahead_first_step_is_plain_sgd(x64):
    loss_fn, params, extra, batch = make_problem("mlp")
    tx = optax.sgd(LR, momentum=0.9)
    shared, rest = shared_rest(params, extra)
    update_fn = optax_lookahead(tx, tx.init(params), shared, rest["params"])
    assert_close(lookahead_affinity(loss_fn, shared, rest, batch, lr=LR, update_fn=update_fn),
                 lookahead_affinity(loss_fn, shared, rest, batch, lr=LR))


def test_adam_lookahead_matches_hand_written_update(x64):
    loss_fn, params, extra, batch = make_problem("cnn")
    b1, b2, eps = 0.9, 0.999, 1e-8
    tx = optax.adam(LR, b1=b1, b2=b2, eps=eps)
    params, state, history = train_a_few_steps(tx, loss_fn, params, extra, batch)
    mu = jax.tree.map(jnp.zeros_like, history[0])
    nu = jax.tree.map(jnp.zeros_like, history[0])
    for g in history:
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, g)
        nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * g * g, nu, g)
    count = len(history) + 1

    def adam_delta(g):
        def leaf(g, m, n):
            m = (b1 * m + (1 - b1) * g) / (1 - b1 ** count)
            n = (b2 * n + (1 - b2) * g * g) / (1 - b2 ** count)
            return LR * m / (jnp.sqrt(n) + eps)
        return jax.tree.map(leaf, g, mu, nu)

    shared, rest = shared_rest(params, extra)
    ref = loop_reference(loss_fn, shared, rest, batch, LR, adam_delta)
    got = lookahead_affinity(loss_fn, shared, rest, batch, lr=LR,
                             update_fn=optax_lookahead(tx, state, shared, rest["params"]),
                             strategy="unrolled")
    assert_close(got, ref)
    # an optimizer state for the shared tree alone gives the same lookahead
    shared_state = optax.adam(LR, b1=b1, b2=b2, eps=eps).init(shared)
    shared_state = (shared_state[0]._replace(count=state[0].count, mu=split_params(state[0].mu)[0],
                                             nu=split_params(state[0].nu)[0]), *shared_state[1:])
    alone = lookahead_affinity(loss_fn, shared, rest, batch, lr=LR,
                               update_fn=optax_lookahead(tx, shared_state, shared))
    assert_close(alone, ref)


def test_float32_agrees_with_float64_to_float32_precision():
    """Z = (1 - L_after / L_before) / lr: the ratio carries float32 rounding (~1e-7 per op,
    a few hundred ops deep -> ~1e-5 relative on the ratio in the worst case), and 1 - ratio is
    O(lr * |Z|), so the absolute error on Z is ~1e-5 / lr = 2e-4 here, about 1% of the
    typical entry (~0.05)."""
    loss_fn, params, extra, batch = make_problem("cnn", jnp.float32)
    shared, rest = shared_rest(params, extra)
    affinity = lambda s, r, b: lookahead_affinity(loss_fn, s, r, b, lr=LR)  # noqa: E731
    z32 = np.asarray(jax.jit(affinity)(shared, rest, batch))
    assert z32.dtype == np.float32
    with jax.enable_x64(True):
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
                                      if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
        z64 = np.asarray(jax.jit(affinity)(cast(shared), cast(rest), cast(batch)))
    assert np.abs(z64).max() > 1e-2
    np.testing.assert_allclose(z32, z64, atol=2e-4, rtol=0)


def test_orientation_source_row_target_column(x64):
    """Task 0's step helps task 1, task 1's step hurts task 0: Z[0, 1] > 0 > Z[1, 0].

    L_0 = 2 - a + 30 b^2, L_1 = 2 - a - b at (a, b) = 0, SGD with lr = 0.1. Task 0's step
    moves (a, b) to (0.1, 0): L_1 = 1.9, Z[0, 1] = (1 - 1.9 / 2) / 0.1 = 0.5. Task 1's step
    moves to (0.1, 0.1): L_0 = 2.2, Z[1, 0] = (1 - 2.2 / 2) / 0.1 = -1. Diagonal: 0.5, 1.
    """
    def loss_fn(shared, rest, batch):
        a, b = shared["w"][0], shared["w"][1]
        return jnp.stack([2.0 - a + 30.0 * b ** 2, 2.0 - a - b])

    z = lookahead_affinity(loss_fn, {"w": jnp.zeros(2)}, {}, None, lr=0.1)
    assert_close(z, [[0.5, 0.5], [-1.0, 1.0]], atol=1e-12)


def test_strategy_resolution_is_documented_and_validated():
    assert jax.default_backend() == "cpu"
    assert resolve_strategy("vmap", 9, None) == ("vmap", None)
    assert resolve_strategy("vmap", 9, None, backward=True) == ("vmap", None)
    assert resolve_strategy("auto", 312, None) == ("chunked", 1)       # forwards: a loop
    assert resolve_strategy("auto", 9, 4) == ("chunked", 4)
    for strategy in ("auto", "chunked"):                               # CPU backward: unrolled
        assert resolve_strategy(strategy, 312, 8, backward=True) == ("unrolled", None)
    with pytest.raises(ValueError, match="strategy must be one of"):
        resolve_strategy("loop", 9, None)
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_strategy("chunked", 9, 0)


def test_bad_inputs_raise_clear_errors():
    loss_fn, params, extra, batch = make_problem("mlp", jnp.float32)
    shared, rest = shared_rest(params, extra)
    for lr in (0.0, -0.1):
        with pytest.raises(ValueError, match="lr must be a positive"):
            lookahead_affinity(loss_fn, shared, rest, batch, lr=lr)
    summed = lambda s, r, b: loss_fn(s, r, b).sum()  # noqa: E731
    per_example = lambda s, r, b: jnp.tile(loss_fn(s, r, b), (4, 1))  # noqa: E731
    for bad in (summed, per_example):
        with pytest.raises(ValueError, match=r"vector of shape \(T,\)"):
            lookahead_affinity(bad, shared, rest, batch, lr=LR)
        with pytest.raises(ValueError, match=r"vector of shape \(T,\)"):
            jax.jit(per_task_grads, static_argnums=0)(bad, shared, rest, batch)
    with pytest.raises(ValueError, match="shared is an empty tree"):
        lookahead_affinity(loss_fn, {}, rest, batch, lr=LR)
    with pytest.raises(ValueError, match="shared is an empty tree"):
        gradient_cosine(loss_fn, {}, rest, batch)


# ---------------------------------------------------------------- gradient cosine

def test_gradient_cosine_matches_numpy_over_kernels(x64):
    loss_fn, params, extra, batch = make_problem("cnn")
    shared, rest = shared_rest(params, extra)
    flat = []
    for i in range(3):
        g = jax.grad(lambda s: loss_fn(s, rest, batch)[i])(shared)
        flat.append(np.concatenate([np.ravel(k) for k in jax.tree.leaves(g) if k.ndim > 1]))
    flat = np.stack(flat)
    norms = np.linalg.norm(flat, axis=1)
    ref = flat @ flat.T / np.outer(norms, norms)
    got = jax.jit(gradient_cosine, static_argnums=0)(loss_fn, shared, rest, batch)
    assert_close(got, ref, atol=1e-12)
    assert_close(np.diag(got), np.ones(3), atol=1e-12)


# ---------------------------------------------------------------- cross-framework anchor

def tag_common_weights(n_tasks=9, hw=64, batch=16):
    """The numpy recipe of anchors/tag_common.py (make_weights seed 0, make_batch seed 1)."""
    r = np.random.default_rng(0)
    he = lambda shape, fan_in: r.standard_normal(shape) * np.sqrt(2.0 / fan_in)  # noqa: E731
    w = {"conv0": he((3, 3, 3, 64), 27), "conv1": he((3, 3, 64, 64), 576),
         "conv2": he((3, 3, 64, 64), 576)}
    for k in ("bn0", "bn1", "bn2"):
        w[k + "_g"] = 1.0 + 0.1 * r.standard_normal(64)
        w[k + "_b"] = 0.1 * r.standard_normal(64)
    d = (hw // 4) ** 2 * 64
    w["head_k"] = r.standard_normal((n_tasks, d, 2)) / np.sqrt(d)
    w["head_b"] = 0.1 * r.standard_normal((n_tasks, 2))
    rb = np.random.default_rng(1)
    x = rb.standard_normal((batch, hw, hw, 3))
    y = rb.integers(0, 2, (batch, n_tasks)).astype(np.int32)
    return w, x, y


def test_lookahead_matches_tensorflow_anchor(x64):
    ref = np.load(DATA / "affinity_tf.npz")
    w, x, y = tag_common_weights()
    model = models.RoutedResNet(num_tasks=9)

    def conv_bn(conv, bn):
        return {"Conv_0": {"kernel": w[conv]},
                "BatchNorm_0": {"scale": w[bn + "_g"], "bias": w[bn + "_b"]}}

    shared = {"encoder": {"ConvNormRoute_0": conv_bn("conv0", "bn0"),
                          "_ResidualBlock_0": {"ConvNormRoute_0": conv_bn("conv1", "bn1"),
                                               "ConvNormRoute_1": conv_bn("conv2", "bn2")}}}
    head = {"head": {"kernel": np.transpose(w["head_k"], (1, 0, 2)), "bias": w["head_b"]}}
    stats = jax.tree.map(np.zeros_like, model.init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)), None)["batch_stats"])

    def loss_fn(s, r, b):
        logits, _ = model.apply({"params": merge_params(s, r), "batch_stats": stats},
                                b["image"], None, True, mutable=["batch_stats"])
        return per_task_ce(logits, b["labels"])

    batch = {"image": x, "labels": y}
    shared, head, batch = jax.tree.map(jnp.asarray, (shared, head, batch))
    assert_close(loss_fn(shared, head, batch), ref["loss_float64"], rtol=1e-12, atol=0)
    z = jax.jit(lambda s, r, b: lookahead_affinity(loss_fn, s, r, b, lr=5e-4),
                # XLA's default level: this float64 step runs ~7x longer at the tests' level 0
                # (tests/conftest.py), which is cheaper only where compiling dominates.
                compiler_options={"xla_backend_optimization_level": 3})(
        shared, head, batch)
    assert np.abs(ref["z_float64"]).max() > 1.0
    assert_close(z, ref["z_float64"], rtol=1e-7, atol=1e-7)

"""Tests for tr_jax.affinity.estimators: Taylor, sketched and representation affinity."""
import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import grouping
from tr_jax.affinity import estimators as est
from tr_jax.affinity import merge_params, per_task_grads, split_params
from tr_jax.affinity.lookahead import lookahead_affinity, optax_lookahead
from tr_jax.models import MLP, SmallCNN, apply_all_tasks
from tr_jax.losses import per_task_losses

NUM_TASKS = 5
WARMUP = 60


@functools.lru_cache(maxsize=None)
def mlp_problem(num_tasks=NUM_TASKS, hidden=(16, 16), batch=32, dim=10, seed=0,
                dtype=jnp.float64):
    """A small MLP, its (shared, rest) split, a batch and a float64-exact loss_fn."""
    model = MLP(num_tasks=num_tasks, hidden=hidden)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, dim), dtype)
    y = jax.random.bernoulli(ky, 0.5, (batch, num_tasks)).astype(jnp.int32)
    params = jax.tree.map(lambda a: a.astype(dtype),
                          jax.jit(model.init)({"params": kp}, x, 0)["params"])
    shared, rest = split_params(params)

    def loss_fn(s, r, b):
        logits, _ = apply_all_tasks(model, {"params": merge_params(s, r)}, b["image"])
        # per_task_losses computes in float32; this keeps float64 for tight comparisons.
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, b["labels"][..., None], -1)[..., 0].mean(0)

    return model, params, shared, rest, {"image": x, "labels": y}, loss_fn


def exact_gram_affinity(loss_fn, shared, rest, batch):
    """g_i·g_j / L_j from an explicit loop of jax.grad over tasks (independent reference)."""
    losses = loss_fn(shared, rest, batch)
    grad_i = jax.jit(lambda s, i: jax.flatten_util.ravel_pytree(
        jax.grad(lambda p: loss_fn(p, rest, batch)[i])(s))[0])
    g = np.stack([np.asarray(grad_i(shared, i)) for i in range(losses.shape[0])])
    return g @ g.T / np.asarray(losses)[None, :], g


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- Taylor


def test_taylor_is_the_gradient_gram(x64):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    ref, _ = exact_gram_affinity(loss_fn, shared, rest, batch)
    got = est.taylor_affinity(loss_fn, shared, rest, batch, lr=0.1)
    assert got.shape == (NUM_TASKS, NUM_TASKS)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_taylor_converges_to_lookahead_as_lr_shrinks(x64):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    err1, err2 = [], []
    for lr in (1e-3, 1e-4, 1e-5):  # larger steps cross ReLU kinks
        exact = lookahead_affinity(loss_fn, shared, rest, batch, lr=lr)
        err1.append(rel_err(est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr), exact))
        err2.append(rel_err(est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr, order=2),
                            exact))
    # first order: error O(lr); second order: O(lr^2) and smaller than first order.
    assert err1[0] > 8 * err1[1] > 64 * err1[2] > 0
    assert err2[0] > 50 * err2[1]
    assert all(e2 < e1 / 100 for e1, e2 in zip(err1, err2))
    assert err1[0] < 1e-3


def test_taylor_with_optimizer_update_matches_its_lookahead(x64):
    _, params, shared, rest, batch, loss_fn = mlp_problem()
    lr = 1e-4
    tx = optax.sgd(lr, momentum=0.9)
    state = tx.init(params)
    # one real step so that the momentum buffer is non-zero
    grads = jax.grad(lambda p: loss_fn(*split_params(p), batch).sum())(params)
    _, state = tx.update(grads, state, params)
    update_fn = optax_lookahead(tx, state, shared, rest)
    exact = lookahead_affinity(loss_fn, shared, rest, batch, lr=lr, update_fn=update_fn)
    got = est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr, update_fn=update_fn)
    plain = est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr)
    assert rel_err(got, exact) < 1e-3
    assert rel_err(plain, exact) > 0.1  # the momentum term matters


def test_taylor_has_no_float32_cancellation():
    """At TAG's lr = 5e-4 the exact lookahead's 1 - after / before loses precision in float32;
    the Gram form does not."""
    lr = 5e-4
    with jax.enable_x64(True):
        _, _, shared, rest, batch, loss_fn = mlp_problem()
        ref = est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr)
        ref_exact = lookahead_affinity(loss_fn, shared, rest, batch, lr=lr)
    to32 = functools.partial(jax.tree.map, lambda a: jnp.asarray(
        a, jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype))
    args = (loss_fn, to32(shared), to32(rest), to32(batch))
    err_taylor = rel_err(est.taylor_affinity(*args, lr=lr), ref)
    err_exact = rel_err(lookahead_affinity(*args, lr=lr), ref_exact)
    assert err_taylor < 1e-5 < err_exact


def test_taylor_rejects_bad_arguments(x64):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    with pytest.raises(ValueError, match="order"):
        est.taylor_affinity(loss_fn, shared, rest, batch, lr=0.1, order=3)
    with pytest.raises(ValueError, match="lr"):
        est.taylor_affinity(loss_fn, shared, rest, batch, lr=0.0)


# ----------------------------------------------------------------------------- sketch


def sketches(loss_fn, shared, rest, batch, k, num_keys, distribution="rademacher", seed=0):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    fn = jax.jit(jax.vmap(lambda key: est.sketched_affinity(
        loss_fn, shared, rest, batch, lr=0.1, key=key, num_directions=k,
        distribution=distribution, strategy="vmap")))
    return np.asarray(fn(keys))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_sketch_is_unbiased_with_the_documented_variance(x64, distribution):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    ref, _ = exact_gram_affinity(loss_fn, shared, rest, batch)
    losses, grads = per_task_grads(loss_fn, shared, rest, batch)
    k, n = 4, 3000
    var = np.asarray(est.sketch_variance(grads, k, distribution)) / np.asarray(losses)[None] ** 2
    samples = sketches(loss_fn, shared, rest, batch, k, n, distribution)
    z = (samples.mean(0) - ref) / np.sqrt(var / n)
    assert np.abs(z).max() < 4.5, z  # unbiased: the mean is within sampling error
    np.testing.assert_allclose(samples.var(0), var, rtol=0.25)


def test_sketch_error_falls_like_one_over_sqrt_k(x64):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    ref, _ = exact_gram_affinity(loss_fn, shared, rest, batch)
    rms = [np.sqrt(((sketches(loss_fn, shared, rest, batch, k, 400, seed=k) - ref) ** 2).mean())
           for k in (4, 64)]
    assert 3.0 < rms[0] / rms[1] < 5.3  # sqrt(64 / 4) = 4


def test_sketch_strategies_agree_and_keys_matter(x64):
    _, _, shared, rest, batch, loss_fn = mlp_problem()
    key = jax.random.key(3)
    out = [jax.jit(lambda k, s=s: est.sketched_affinity(
        loss_fn, shared, rest, batch, lr=0.1, key=k, num_directions=6, strategy=s,
        chunk_size=4))(key) for s in ("vmap", "unrolled", "chunked")]
    np.testing.assert_allclose(out[1], out[0], rtol=1e-10)
    np.testing.assert_allclose(out[2], out[0], rtol=1e-10)
    other = est.sketched_affinity(loss_fn, shared, rest, batch, lr=0.1,
                                  key=jax.random.key(4), num_directions=6)
    assert not np.allclose(other, out[0])
    with pytest.raises(ValueError, match="num_directions"):
        est.sketched_affinity(loss_fn, shared, rest, batch, lr=0.1, key=key, num_directions=0)
    with pytest.raises(ValueError, match="distribution"):
        est.sketched_affinity(loss_fn, shared, rest, batch, lr=0.1, key=key,
                              distribution="uniform")


def test_sketch_with_momentum_update_is_unbiased(x64):
    _, params, shared, rest, batch, loss_fn = mlp_problem()
    lr = 1e-2
    tx = optax.sgd(lr, momentum=0.9)
    grads = jax.grad(lambda p: loss_fn(*split_params(p), batch).sum())(params)
    _, state = tx.update(grads, tx.init(params), params)
    update_fn = optax_lookahead(tx, state, shared, rest)
    ref = est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr, update_fn=update_fn)
    keys = jax.random.split(jax.random.key(0), 1000)
    samples = jax.jit(jax.vmap(lambda key: est.sketched_affinity(
        loss_fn, shared, rest, batch, lr=lr, key=key, num_directions=4, update_fn=update_fn,
        strategy="vmap")))(keys)
    plain = est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr)
    assert rel_err(samples.mean(0), ref) < 0.05 < rel_err(plain, ref)


def compiled_flops(fn, *args):
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_sketch_cost_does_not_grow_with_tasks():
    """XLA's FLOP count: T = 9 -> 312 adds only the heads' share to the sketch, while the
    per-task-gradient (Taylor) cost grows with T."""
    batch_size, dim, width, feat, k = 16, 256, 256, 8, 4
    flops = {}
    for t in (9, 312):
        _, _, shared, rest, batch, loss_fn = mlp_problem(
            num_tasks=t, hidden=(width, width, feat), batch=batch_size, dim=dim,
            dtype=jnp.float32)
        key = jax.random.key(0)
        flops["sketch", t] = compiled_flops(lambda s, r, b: est.sketched_affinity(
            loss_fn, s, r, b, lr=0.1, key=key, num_directions=k, strategy="unrolled"),
            shared, rest, batch)
        flops["taylor", t] = compiled_flops(lambda s, r, b: est.taylor_affinity(
            loss_fn, s, r, b, lr=0.1), shared, rest, batch)
    # heads: logits (B, D) x (D, T*K) per forward; a JVP is at most ~3 such passes per direction
    head_share = 3 * k * 2 * batch_size * feat * 2 * (312 - 9)
    assert 0 <= flops["sketch", 312] - flops["sketch", 9] <= head_share + 2e5
    assert flops["sketch", 312] < 1.1 * flops["sketch", 9]
    assert flops["taylor", 312] > 10 * flops["taylor", 9]


# ----------------------------------------------------------------------------- representation


def test_model_representation_reproduces_the_model():
    model = SmallCNN(num_tasks=4, widths=(4, 8))
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
    labels = jax.random.bernoulli(jax.random.key(1), 0.5, (6, 4)).astype(jnp.int32)
    variables = jax.jit(model.init)({"params": jax.random.key(2)}, x, 0)
    features_fn, head_loss_fn = est.model_representation(model)
    for train in (False, True):
        feats, stats = jax.jit(functools.partial(features_fn, train=train))(variables, x)
        logits, ref_stats = jax.jit(functools.partial(apply_all_tasks, model, train=train))(
            variables, x)
        want = per_task_losses(logits, labels)
        got = head_loss_fn(feats, variables["params"]["head"], {"labels": labels})
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert (stats is None) == (ref_stats is None)
        if train:
            jax.tree.map(np.testing.assert_allclose, stats, ref_stats)
    with pytest.raises(ValueError, match="routed"):
        est.model_representation(SmallCNN(num_tasks=4, sharing=0.5))


def test_representation_affinity_is_the_feature_gradient_gram(x64):
    model, params, _, _, batch, _ = mlp_problem()
    features_fn, head_loss_fn = est.model_representation(model)
    feats, _ = features_fn({"params": params}, batch["image"])
    head = params["head"]
    losses = head_loss_fn(feats, head, batch)
    r = np.stack([np.asarray(jax.grad(lambda z, i=i: head_loss_fn(z, head, batch)[i])(feats))
                  .ravel() for i in range(NUM_TASKS)])
    want = r @ r.T / np.asarray(losses)[None]
    got = est.representation_affinity(head_loss_fn, feats, head, batch, lr=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = est.model_representation_affinity(model, {"params": params}, batch, lr=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_representation_affinity_is_exact_when_the_tangent_kernel_is_identity(x64):
    """Linear encoder z = x W on orthonormal inputs: J Jᵀ = I, so the representation
    affinity equals the parameter-space (Taylor) affinity."""
    batch_size, dim, feat, t = 6, 8, 3, 4
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (dim, batch_size)))
    x = q.T  # (B, dim) with orthonormal rows
    labels = jax.random.bernoulli(jax.random.key(1), 0.5, (batch_size, t)).astype(jnp.int32)
    w = jax.random.normal(jax.random.key(2), (dim, feat))
    heads = jax.random.normal(jax.random.key(3), (feat, t, 2))
    batch = {"x": x, "labels": labels}

    def head_loss(z, h, b):
        logp = jax.nn.log_softmax(jnp.einsum("bd,dtk->btk", z, h), -1)
        return -jnp.take_along_axis(logp, b["labels"][..., None], -1)[..., 0].mean(0)

    full = est.taylor_affinity(lambda s, h, b: head_loss(b["x"] @ s, h, b), w, heads, batch,
                               lr=0.1)
    rep = est.representation_affinity(head_loss, x @ w, heads, batch, lr=0.1)
    np.testing.assert_allclose(rep, full, rtol=1e-10)


# ----------------------------------------------------------------------------- planted groups


def planted_problem(groups=((0, 1, 2), (3, 4, 5), (6, 7, 8)), n=256, dim=12, seed=0):
    """Tasks in a group threshold the same random projection (plus a small per-task shift);
    groups use independent projections."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    t = sum(len(g) for g in groups)
    labels = np.zeros((n, t), np.int32)
    for g in groups:
        proj = x @ rng.normal(size=dim)
        for task in g:
            labels[:, task] = proj + 0.2 * rng.normal() > 0
    return x, labels


def test_planted_groups_are_recovered_by_every_estimator():
    x, labels = planted_problem()
    t = labels.shape[1]
    model = MLP(num_tasks=t, hidden=(32,))
    params = model.init({"params": jax.random.key(0)}, x[:1], 0)["params"]
    features_fn, head_loss_fn = est.model_representation(model)

    def loss_fn(s, r, b):
        logits, _ = apply_all_tasks(model, {"params": merge_params(s, r)}, b["image"])
        return per_task_losses(logits, b["labels"])

    lr = 0.1

    @jax.jit
    def step(params, batch, key):
        shared, rest = split_params(params)
        feats, _ = features_fn({"params": params}, batch["image"])
        out = {"exact": lookahead_affinity(loss_fn, shared, rest, batch, lr=lr),
               "taylor": est.taylor_affinity(loss_fn, shared, rest, batch, lr=lr),
               "sketch": est.sketched_affinity(loss_fn, shared, rest, batch, lr=lr, key=key,
                                               num_directions=8),
               "representation": est.representation_affinity(
                   head_loss_fn, feats, rest["head"], batch, lr=lr)}
        grads = jax.grad(lambda p: loss_fn(*split_params(p), batch).sum())(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), out

    sums = {}
    rng = np.random.default_rng(1)
    for i in range(WARMUP + 30):
        idx = rng.choice(len(x), 64, replace=False)
        params, out = step(params, {"image": x[idx], "labels": labels[idx]},
                           jax.random.key(i))
        if i >= WARMUP:  # affinity between freshly initialised heads is mostly noise
            sums = {k: sums.get(k, 0) + np.asarray(v) for k, v in out.items()}
    chosen = {k: set(grouping.select_groups(v, 3, method="exact").groups)
              for k, v in sums.items()}
    assert chosen["exact"] == {(0, 1, 2), (3, 4, 5), (6, 7, 8)}
    for name, groups in chosen.items():
        assert groups == chosen["exact"], name


def test_train_step_measures_representation_affinity():
    from tr_jax import train

    model = SmallCNN(num_tasks=4, widths=(4, 8))
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
    batch = {"image": x,
             "labels": jax.random.bernoulli(jax.random.key(1), 0.5, (6, 4)).astype(jnp.int32)}
    opt = optax.sgd(0.1)
    state = train.create_train_state(model, opt, jax.random.key(2), batch)
    want = est.model_representation_affinity(model, state.variables, batch, lr=0.1)
    step = train.make_train_step(model, opt, affinity="representation", lr=0.1)
    plain = train.make_train_step(model, opt)
    new, metrics = step(state, batch)
    ref, _ = plain(train.create_train_state(model, opt, jax.random.key(2), batch), batch)
    np.testing.assert_allclose(metrics["affinity"], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(train.mean_affinity(new), want, rtol=1e-5, atol=1e-7)
    # the update is unchanged (two programs: float32 rounding may differ by a few ulp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new.params, ref.params)
    with pytest.raises(ValueError, match="routed"):
        train.make_train_step(SmallCNN(num_tasks=4, sharing=0.5), opt,
                              affinity="representation", lr=0.1)


def test_forward_mode_estimators_run_no_winograd_convolutions(monkeypatch):
    """The sketch and the curvature of taylor order 2 run ``jax.jvp``: their convolutions are
    XLA's, not the Winograd lowering (slow in forward mode), which the same loss uses in
    reverse mode; the curvature equals a reverse-mode (Winograd) Hessian-vector product."""
    from tr_jax.nn import conv as conv_lib

    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    c = conv_lib.WINOGRAD_MIN_CIN
    batch = jax.random.normal(jax.random.key(0), (2, 8, 8, c))
    shared = {"k": 0.05 * jax.random.normal(jax.random.key(1), (3, 3, c, 3))}
    rest = jnp.ones(3)

    def loss_fn(s, r, b):
        return jnp.mean(jnp.tanh(conv_lib.conv2d(b, s["k"])) ** 2, axis=(0, 1, 2)) + r

    def sketch(s):
        return est.sketched_affinity(loss_fn, s, rest, batch, lr=0.1, key=jax.random.key(2),
                                     num_directions=4)

    def curvature(s, directions):
        return est.second_directional_derivatives(loss_fn, s, rest, batch, directions)

    def grad_j(s, j):
        return jax.grad(lambda s_: loss_fn(s_, rest, batch)[j])(s)

    directions = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), (2, *a.shape)),
                              shared)
    direct = "conv_general_dilated"
    assert direct in str(jax.make_jaxpr(sketch)(shared))
    assert direct in str(jax.make_jaxpr(curvature)(shared, directions))
    assert direct not in str(jax.make_jaxpr(grad_j, static_argnums=1)(shared, 0))
    assert np.all(np.isfinite(sketch(shared)))
    reference = [[est.tree_gram(jax.tree.map(lambda a: a[None, n], directions),
                                jax.tree.map(lambda a: a[None], jax.jvp(
                                    lambda s: grad_j(s, j), (shared,),
                                    (jax.tree.map(lambda a: a[n], directions),))[1]))[0, 0]
                  for j in range(3)] for n in range(2)]
    np.testing.assert_allclose(curvature(shared, directions), np.array(reference),
                               rtol=2e-4, atol=1e-6)

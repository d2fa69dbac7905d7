"""tr_jax.nn.BatchNorm equals flax.linen.BatchNorm, and training with tr_jax.nn's fast layers
gives the parameters plain Flax layers give.

Each model is trained for a few steps from the same seed twice: with the default
(backend-aware) layers (im2col, winograd, the folded BatchNorm; the test checks that "auto"
picked each conv lowering), and with plain ``lax.conv``
(``TR_JAX_CONV_LOWERING=xla``), ``flax.linen.max_pool`` and ``flax.linen.BatchNorm`` patched
into the backbones. The runs are in float64, where the two agree to ~1e-15: in float32 the
rounding differences of the lowerings (~1e-7) are
amplified by a few SGD-momentum steps through BatchNorm over tiny maps to ~1e-4, which would
hide a real bug behind a loose tolerance.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tr_jax import models, train
from tr_jax.models import backbones, layers
from tr_jax.nn import conv as conv_lib
from tr_jax.nn import norm as norm_lib

# (shape, offset added to the input): 1x1 and 2x2 maps, odd sizes, a (B, C) input, and a mean
# 4 standard deviations from zero (the folded form's rounding grows with |mean| / std).
BN_CASES = [((5, 1, 1, 3), 0.0), ((3, 2, 2, 4), 0.5), ((4, 5, 7, 6), 4.0), ((8, 5), -1.0)]
BN_OPTIONS = [dict(), dict(use_scale=False), dict(use_bias=False)]


def _train(model, state, opt, mode, batch, steps=2):
    step = train.make_train_step(model, opt, mode=mode)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input state
    losses = []
    for i in range(steps):
        extra = {"task": jnp.asarray(i % model.num_tasks, jnp.int32)} if mode != "all_tasks" else {}
        state, metrics = step(state, {**batch, **extra})
        losses.append(float(metrics["loss"]))
    return state, losses


def _bn_outputs(module, variables, x, train, tangent):
    """Output, updated batch_stats, gradients (params, x) of a weighted sum of sin(y), and the
    JVP along ``tangent`` of x."""
    def loss(params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))

    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    _, jvp = jax.jvp(lambda x: loss(variables["params"], x), (x,), (tangent,))
    return y, updates["batch_stats"] if train else None, grads, jvp


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_batch_norm_matches_flax(dtype, x64):
    """Training and inference mode, with and without scale / bias: output, running statistics,
    gradients and forward-mode derivatives equal flax.linen.BatchNorm's (one jit for all)."""
    rtol = 2e-5 if dtype == jnp.float32 else 1e-12
    runs = []
    for i, (shape, offset) in enumerate(BN_CASES):
        x = jax.random.normal(jax.random.key(i), shape, dtype) * 1.5 + offset
        tangent = jax.random.normal(jax.random.key(50 + i), shape, dtype)
        options = BN_OPTIONS[i % len(BN_OPTIONS)]
        for training in (True, False):
            kwargs = dict(use_running_average=not training, momentum=0.9, epsilon=1e-5,
                          param_dtype=dtype, **options)
            ref, mine = nn.BatchNorm(**kwargs), norm_lib.BatchNorm(**kwargs)
            variables = ref.init(jax.random.key(0), x)
            assert jax.tree.map(jnp.shape, mine.init(jax.random.key(0), x)) == \
                jax.tree.map(jnp.shape, variables)
            # non-trivial parameters and running statistics
            leaves, tree = jax.tree.flatten(variables)
            keys = jax.random.split(jax.random.key(100 + i), len(leaves))
            variables = jax.tree.unflatten(tree, [
                jnp.abs(a + 0.3 * jax.random.normal(k, a.shape, a.dtype))
                for a, k in zip(leaves, keys)])
            runs.append((f"{shape} {options} train={training}", ref, mine, training,
                         (variables, x, tangent)))

    @jax.jit
    def evaluate(inputs):
        return [tuple(_bn_outputs(m, *args[:2], training, args[2]) for m in (ref, mine))
                for (_, ref, mine, training, _), args in zip(runs, inputs)]

    for (label, *_), (want, got) in zip(runs, evaluate([r[-1] for r in runs])):
        assert got[0].dtype == want[0].dtype == dtype
        # gradients cancel to small entries: the tolerance scales with the largest
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))), err_msg=label), got, want)


def test_batch_norm_low_precision_dtype_like_flax():
    """bfloat16 inputs: statistics in float32, result dtype promoted as flax does."""
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)).astype(jnp.bfloat16)
    for dtype in (None, jnp.bfloat16):
        ref = nn.BatchNorm(use_running_average=False, dtype=dtype)
        mine = norm_lib.BatchNorm(use_running_average=False, dtype=dtype)
        variables = ref.init(jax.random.key(0), x)
        (want, w_stats), (got, g_stats) = (m.apply(variables, x, mutable=["batch_stats"])
                                           for m in (ref, mine))
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                   rtol=2e-2, atol=2e-2)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     g_stats, w_stats)


def test_fast_layers_train_like_plain_flax(x64, monkeypatch):
    """Routed VGG-11-BN (width 1/2) at 32x32 input: 3x3 convs on 32..2-pixel maps and 2x2
    max-pools, against plain flax layers with "xla". "auto" runs every lowering here: xla on
    32x32 and 16x16 (the latter with 32 input channels), winograd F(4x4, 3x3) on 8x8 and
    F(2x2, 3x3) on 4x4, im2col on 2x2. (The TAG encoder's 3x3/2 pool is covered by
    tests/test_nn_pool.py.)"""
    rng = np.random.default_rng(0)
    num_tasks = 3
    batch = {"image": jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float64),
             "labels": jnp.asarray(rng.integers(0, 2, (2, num_tasks)), jnp.int32)}
    model = models.RoutedVGG(num_tasks=num_tasks, sharing=0.5, width_multiplier=0.5)
    mode = "task_per_batch"
    opt = optax.sgd(0.05, momentum=0.9)
    state = train.create_train_state(model, opt, jax.random.key(0), batch)
    # Parameters and statistics in float64 too: float32 ones would round each update, where
    # two programs may differ by an ulp (an FMA in one and not the other).
    params, stats = jax.tree.map(lambda a: a.astype(jnp.float64), (state.params,
                                                                   state.batch_stats))
    state = state.replace(params=params, batch_stats=stats, opt_state=opt.init(params))
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    chosen = []   # (output side, lowering) of every conv the fast steps trace
    resolve_lowering = conv_lib.resolve_lowering

    def recording_resolve(*args, **kwargs):
        lowering = resolve_lowering(*args, **kwargs)
        chosen.append((args[1][1], lowering))   # SAME padding, stride 1: output side = input's
        return lowering

    monkeypatch.setattr(conv_lib, "resolve_lowering", recording_resolve)
    fast, fast_losses = _train(model, state, opt, mode, batch)
    assert sorted(set(chosen)) == [(2, "im2col"), (4, "winograd"), (8, "winograd"),
                                   (16, "xla"), (32, "xla")]
    monkeypatch.setenv(conv_lib.ENV_VAR, "xla")
    monkeypatch.setattr(backbones, "max_pool", nn.max_pool)
    monkeypatch.setattr(layers, "BatchNorm", nn.BatchNorm)
    plain, plain_losses = _train(model, state, opt, mode, batch)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-12)
    for got, want in ((fast.params, plain.params), (fast.batch_stats, plain.batch_stats)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                     got, want)

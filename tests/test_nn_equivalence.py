"""Training with tr_jax.nn's fast layers gives the parameters plain Flax layers give.

Each model is trained for a few steps from the same seed twice: with the default
(backend-aware) layers, and with plain ``lax.conv`` (``TR_JAX_CONV_LOWERING=xla``) and
``flax.linen.max_pool`` patched into the backbones. The runs are in float64, where the two
agree to ~1e-15: in float32 the summation-order differences of the lowerings (~1e-7) are
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
from tr_jax.models import backbones
from tr_jax.nn import conv as conv_lib


def _train(model, state, opt, mode, batch, steps=2):
    step = train.make_train_step(model, opt, mode=mode)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input state
    losses = []
    for i in range(steps):
        extra = {"task": jnp.asarray(i % model.num_tasks, jnp.int32)} if mode != "all_tasks" else {}
        state, metrics = step(state, {**batch, **extra})
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_fast_layers_train_like_plain_flax(x64, monkeypatch):
    """Routed VGG-11-BN at 16x16 input: 3x3 convs on 16..1-pixel maps (xla and im2col) and
    2x2 max-pools. (The TAG encoder's 3x3/2 pool is covered by tests/test_nn_pool.py.)"""
    rng = np.random.default_rng(0)
    num_tasks = 3
    batch = {"image": jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float64),
             "labels": jnp.asarray(rng.integers(0, 2, (4, num_tasks)), jnp.int32)}
    model = models.RoutedVGG(num_tasks=num_tasks, sharing=0.5, width_multiplier=0.125)
    mode = "task_per_batch"
    opt = optax.sgd(0.05, momentum=0.9)
    state = train.create_train_state(model, opt, jax.random.key(0), batch)
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)
    fast, fast_losses = _train(model, state, opt, mode, batch)
    monkeypatch.setenv(conv_lib.ENV_VAR, "xla")
    monkeypatch.setattr(backbones, "max_pool", nn.max_pool)
    plain, plain_losses = _train(model, state, opt, mode, batch)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-12)
    for got, want in ((fast.params, plain.params), (fast.batch_stats, plain.batch_stats)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                     got, want)

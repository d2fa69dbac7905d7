"""tr_jax.nn.pool.max_pool equals flax.linen.max_pool: value, VJP and JVP, float32 and float64,
including ties (the gradient goes to the row-major first maximum), padding and NaNs."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_jax.nn import max_pool

# shape, window, strides, padding
CASES = [
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (3, 3), (2, 2), "SAME"),
    ((3, 6, 6, 4), (3, 3), (2, 2), "SAME"),
    ((2, 5, 5, 2), (2, 2), (1, 1), "VALID"),
    ((1, 2, 2, 2), (2, 2), (2, 2), "VALID"),
    ((3, 7, 6, 4), (3, 2), (1, 2), ((1, 2), (0, 1))),
    ((2, 3, 3, 1), (3, 3), (1, 1), ((2, 2), (2, 2))),
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),   # trailing rows and columns no window reaches
    ((2, 8, 7, 2), (2, 2), (3, 3), "VALID"),   # stride wider than the window
]


def _inputs(shape, dtype, seed):
    """Rounded, ReLU-ed values: many exact ties, including all-zero windows."""
    x = jax.random.normal(jax.random.key(seed), shape, dtype)
    return jnp.maximum(jnp.round(x * 2) / 2, 0.0)


def _check_all(cases, dtype, rtol):
    """One jit over all cases: value, VJP (tied inputs) and JVP (tie-free inputs; on ties,
    flax's own JVP -- select-and-gather -- and VJP -- select-and-scatter, first maximum --
    disagree, and ours follows the VJP) of tr_jax's max_pool against flax's."""
    pools = [functools.partial(f, window_shape=w, strides=s, padding=p)
             for _, w, s, p in cases for f in (nn.max_pool, max_pool)]

    @jax.jit
    def evaluate(inputs):
        out = []
        for (ref, mine), (x, ct, x_free, tangent) in zip(zip(pools[::2], pools[1::2]), inputs):
            out.append([(f(x), jax.vjp(f, x)[1](ct)[0], jax.jvp(f, (x_free,), (tangent,))[1])
                        for f in (ref, mine)])
        return out

    inputs = []
    for i, (shape, *_) in enumerate(cases):
        x = _inputs(shape, dtype, i)
        ct_shape = jax.eval_shape(pools[2 * i], x).shape
        inputs.append((x, jax.random.normal(jax.random.key(100 + i), ct_shape, dtype),
                       *(jax.random.normal(jax.random.key(k + i), shape, dtype)
                         for k in (200, 300))))
    for case, (ref, mine) in zip(cases, evaluate(inputs)):
        np.testing.assert_array_equal(mine[0], ref[0], err_msg=str(case))
        np.testing.assert_allclose(mine[1], ref[1], rtol=rtol, atol=rtol, err_msg=f"{case} vjp")
        np.testing.assert_array_equal(mine[2], ref[2], err_msg=f"{case} jvp")


def test_matches_flax_max_pool_float32():
    _check_all(CASES, jnp.float32, 1e-6)


def test_matches_flax_max_pool_float64():
    with jax.enable_x64(True):
        _check_all(CASES[:3], jnp.float64, 1e-14)


def test_ties_send_the_gradient_to_the_first_maximum():
    x = jnp.zeros((1, 2, 2, 1))
    grad = jax.grad(lambda a: max_pool(a, (2, 2), (2, 2)).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_nan_propagates_like_max():
    x = jnp.array([1.0, jnp.nan, 3.0, 0.5]).reshape(1, 2, 2, 1)
    assert np.isnan(max_pool(x, (2, 2), (2, 2))).all()
    # the custom JVP rule computes its own primal output (the separable chain of selects)
    assert np.isnan(jax.jvp(lambda a: max_pool(a, (2, 2), (2, 2)), (x,), (x,))[0]).all()


def test_vmap_matches_loop():
    x = _inputs((4, 2, 6, 6, 3), jnp.float32, 0)
    f = lambda a: jax.grad(lambda b: jnp.sum(max_pool(b, (3, 3), (2, 2), "SAME") ** 2))(a)  # noqa: E731
    batched = jax.jit(jax.vmap(f))(x)
    for i in range(4):
        np.testing.assert_allclose(batched[i], f(x[i]), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="B, H, W, C"):
        max_pool(jnp.ones((4, 4, 3)), (2, 2))
    with pytest.raises(TypeError, match="floating"):
        max_pool(jnp.ones((1, 4, 4, 3), jnp.int32), (2, 2))
    with pytest.raises(ValueError, match=r"window \(3, 3\) .* does not fit the map \(2, 2\)"):
        max_pool(jnp.ones((1, 2, 2, 3)), (3, 3))
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"window_shape=\(2, 2, 2\) must be a positive int"):
        max_pool(x, (2, 2, 2))
    with pytest.raises(ValueError, match=r"strides=\(0, 0\) must be a positive int"):
        max_pool(x, (2, 2), (0, 0))
    with pytest.raises(ValueError, match=r"padding\[0\]='1' must be an int"):
        max_pool(x, (2, 2), padding=("1", 1))


def test_int_window_strides_and_padding_mean_both_dims():
    """An int n (NumPy ints included) means (n, n)."""
    x = _inputs((2, 7, 7, 3), jnp.float32, 0)
    want = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for args in ((3, 2, 1), (np.int64(3), np.int32(2), np.int64(1))):
        np.testing.assert_array_equal(max_pool(x, *args), want)

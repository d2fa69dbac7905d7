"""Routing masks and the TaskRouting layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_jax import routing


@pytest.mark.parametrize("t,c,sharing", [(5, 64, 0.5), (40, 64, 0.25), (312, 512, 0.9), (3, 7, 0.3)])
def test_random_masks_zero_exactly_int_c_times_one_minus_sigma(t, c, sharing):
    m = np.asarray(routing.make_masks(jax.random.key(0), t, c, sharing, "random"))
    assert m.shape == (t, c) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal((m == 0).sum(1), int(c * (1 - sharing) + 1e-9))


def test_random_mask_count_is_robust_to_float_error():
    # (1 - 0.9) * 10 = 0.0999..*10 = 0.999..: the official code would zero 1 unit, not 0.
    m = routing.make_masks(jax.random.key(0), 4, 10, 0.9)
    np.testing.assert_array_equal((np.asarray(m) == 0).sum(1), 1)


@pytest.mark.parametrize("scheme", routing.SCHEMES)
def test_full_sharing_is_all_ones(scheme):
    np.testing.assert_array_equal(routing.make_masks(jax.random.key(3), 9, 32, 1.0, scheme), 1.0)


def test_partition_zero_sharing_gives_disjoint_cover():
    m = np.asarray(routing.make_masks(jax.random.key(1), 6, 64, 0.0, "partition"))
    np.testing.assert_array_equal(m.sum(0), 1.0)       # every unit serves exactly one task
    assert set(m.sum(1)) <= {10.0, 11.0}               # balanced: 64 = 6 * 10 + 4


def test_partition_more_tasks_than_units_is_balanced():
    m = np.asarray(routing.make_masks(jax.random.key(2), 312, 64, 0.0, "partition"))
    np.testing.assert_array_equal(m.sum(1), 1.0)       # each task one specific unit
    assert set(m.sum(0)) <= {4.0, 5.0}                 # 312 = 64 * 4 + 56


def test_partition_shared_units_are_common_to_all_tasks():
    m = np.asarray(routing.make_masks(jax.random.key(4), 5, 40, 0.5, "partition"))
    shared = m.all(0)
    assert shared.sum() == 20
    np.testing.assert_array_equal(m[:, ~shared].sum(0), 1.0)  # the rest task-specific


@pytest.mark.parametrize("scheme", routing.SCHEMES)
def test_masks_are_deterministic_in_the_key(scheme):
    a = routing.make_masks(jax.random.key(7), 8, 32, 0.3, scheme)
    b = routing.make_masks(jax.random.key(7), 8, 32, 0.3, scheme)
    c = routing.make_masks(jax.random.key(8), 8, 32, 0.3, scheme)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("sharing", [-0.1, 1.5, float("nan")])
def test_sharing_out_of_range_is_an_error(sharing):
    with pytest.raises(ValueError, match=r"sharing=.*outside \[0, 1\]"):
        routing.make_masks(jax.random.key(0), 3, 8, sharing)


def test_random_scheme_without_units_names_partition():
    with pytest.raises(ValueError, match="partition"):
        routing.make_masks(jax.random.key(0), 3, 8, 0.0, "random")
    with pytest.raises(ValueError, match="scheme"):
        routing.make_masks(jax.random.key(0), 3, 8, 0.5, "bogus")


def _layer_and_vars(t=4, c=6, sharing=0.5):
    layer = routing.TaskRouting(t, sharing)
    x = jnp.ones((3, 5, c))
    return layer, layer.init({"routing": jax.random.key(0)}, x, 0), x


def test_layer_applies_the_task_row_channelwise():
    layer, v, x = _layer_and_vars()
    masks = v["routing"]["masks"]
    assert "params" not in v
    y = layer.apply(v, x * 2.0, 2)
    np.testing.assert_array_equal(y, 2.0 * np.broadcast_to(masks[2], x.shape))


def test_per_example_ids_equal_scalar_routing():
    layer, v, x = _layer_and_vars()
    x = jax.random.normal(jax.random.key(1), x.shape)
    for t in range(4):
        np.testing.assert_array_equal(layer.apply(v, x, jnp.full((3,), t)), layer.apply(v, x, t))
    ids = jnp.array([0, 3, 1])
    expect = np.stack([layer.apply(v, x, int(t))[b] for b, t in enumerate(ids)])
    np.testing.assert_array_equal(layer.apply(v, x, ids), expect)


def test_bad_task_ids_are_errors():
    layer, v, x = _layer_and_vars()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        layer.apply(v, x, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        layer.apply(v, x, jnp.array([0, -1, 2]))
    with pytest.raises(ValueError, match="shape"):
        layer.apply(v, x, jnp.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        layer.apply(v, x, 1.0)


def test_out_of_range_ids_under_jit_are_clamped_unchecked():
    """As documented in check_task_ids: traced ids are not range-checked (the training loop
    checks them on the host), and JAX's indexing clamps them."""
    layer, v, x = _layer_and_vars()
    routed = jax.jit(lambda task: layer.apply(v, x, task))
    np.testing.assert_array_equal(routed(7), layer.apply(v, x, 3))
    np.testing.assert_array_equal(routed(jnp.array([9, -9, 1])),
                                  layer.apply(v, x, jnp.array([3, 0, 1])))

"""Routed backbones: call convention, masks outside params, gradient isolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_jax import models

KEYS = {"params": jax.random.key(0), "routing": jax.random.key(1)}


@pytest.mark.parametrize("model,shape", [
    (models.RoutedVGG(num_tasks=5, sharing=0.5), (2, 8, 8, 3)),
    (models.RoutedVGG(num_tasks=5, sharing=0.5), (2, 224, 224, 3)),
    (models.RoutedResNet(num_tasks=5, sharing=0.5), (2, 64, 64, 3)),
    (models.RoutedResNet18(num_tasks=5, sharing=0.5), (2, 32, 32, 3)),
    (models.RoutedResNet18(num_tasks=5, sharing=0.5, imagenet_stem=True), (2, 64, 64, 3)),
    (models.SmallCNN(num_tasks=5, sharing=0.5), (2, 8, 8, 1)),
    (models.MLP(num_tasks=5, sharing=0.5), (2, 8, 8, 1)),
])
def test_call_convention_shapes(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    v = jax.eval_shape(model.init, KEYS, x, 0)
    assert set(v) >= {"params", "routing"} and set(v["params"]) == {"encoder", "head"}
    assert jax.eval_shape(model.apply, v, x, 3).shape == (2, 2)
    assert jax.eval_shape(model.apply, v, x, jnp.array([0, 4])).shape == (2, 2)
    assert jax.eval_shape(lambda v, x: models.apply_all_tasks(model, v, x)[0], v, x).shape == (
        2, 5, 2)


@pytest.mark.parametrize("model,shape", [
    (models.RoutedResNet(num_tasks=5, sharing=0.5, width=8), (2, 16, 16, 3)),
    (models.SmallCNN(num_tasks=5, sharing=0.5, scheme="partition"), (2, 8, 8, 1)),
])
def test_all_tasks_helper_equals_one_forward_per_task(model, shape):
    x = jax.random.normal(jax.random.key(2), shape)
    v = jax.jit(model.init)(KEYS, x, 0)
    apply = jax.jit(model.apply)
    logits = jax.jit(lambda v, x: models.apply_all_tasks(model, v, x, chunk_size=2)[0])(v, x)
    for t in range(5):
        np.testing.assert_allclose(logits[:, t], apply(v, x, t), rtol=1e-5, atol=1e-5)


def test_all_tasks_helper_rejects_an_empty_chunk():
    model = models.SmallCNN(num_tasks=3, sharing=0.5)
    x = jnp.zeros((1, 8, 8, 1))
    v = model.init(KEYS, x, 0)
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        models.apply_all_tasks(model, v, x, chunk_size=0)


def test_vgg11_has_eight_routed_convs_with_paper_widths():
    m = models.RoutedVGG(num_tasks=3, sharing=0.5)
    v = jax.eval_shape(lambda: m.init(KEYS, jnp.zeros((1, 32, 32, 3)), 0))
    widths = [a.shape[-1] for a in jax.tree.leaves(v["routing"])]
    assert sorted(widths) == sorted([64, 128, 256, 256, 512, 512, 512, 512])


def test_per_example_batch_equals_single_task_forwards_gathered():
    m = models.SmallCNN(num_tasks=7, sharing=0.3)
    x = jax.random.normal(jax.random.key(3), (6, 8, 8, 1))
    v = m.init(KEYS, x, 0)
    apply = jax.jit(m.apply)
    ids = jnp.array([6, 0, 3, 3, 1, 5])
    expect = jnp.stack([apply(v, x, t)[b] for b, t in enumerate(ids)])
    np.testing.assert_allclose(apply(v, x, ids), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply(v, x, jnp.full((6,), 2)), apply(v, x, 2), rtol=1e-6)


def test_unrouted_model_has_no_routing_and_all_heads_in_one_forward():
    m = models.RoutedResNet(num_tasks=4, width=8)
    x = jnp.ones((2, 16, 16, 3))
    v = m.init(KEYS, x, 0)
    assert "routing" not in v
    assert v["params"]["head"]["kernel"].shape == (4 * 4 * 8, 4, 2)
    np.testing.assert_allclose(m.apply(v, x)[:, 2], m.apply(v, x, 2), rtol=1e-6)


def test_masks_do_not_depend_on_parameter_init():
    m = models.SmallCNN(num_tasks=4, sharing=0.5)
    x = jnp.ones((1, 8, 8, 1))
    init = jax.jit(m.init)
    a = init({"params": jax.random.key(0), "routing": jax.random.key(9)}, x, 0)["routing"]
    b = init({"params": jax.random.key(5), "routing": jax.random.key(9)}, x, 0)["routing"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    layers = jax.tree.leaves(a)
    assert not np.array_equal(layers[0], layers[1][:, :32])  # layers draw independently


@pytest.mark.parametrize("model", [models.MLP(num_tasks=3, sharing=0.5, hidden=(16, 16)),
                                   models.SmallCNN(num_tasks=3, sharing=0.5, widths=(8, 16))])
def test_routed_out_units_get_exactly_zero_gradient(model):
    x = jax.random.normal(jax.random.key(4), (4, 8, 8, 1))
    v = model.init(KEYS, x, 0)
    task = 1

    def loss(params):
        return model.apply({**v, "params": params}, x, task, train=True,
                           mutable=["batch_stats"])[0].sum()

    grads = jax.jit(jax.grad(loss))(v["params"])["encoder"]
    masks = [np.asarray(m[task]) for m in jax.tree.leaves(v["routing"])]
    kernels = [g["kernel"] for g in
               (grads[k] if "kernel" in grads[k] else grads[k]["Conv_0"]
                for k in sorted(grads, key=lambda s: int(s.split("_")[-1])))]
    for layer, (kernel_grad, mask) in enumerate(zip(kernels, masks)):
        off = mask == 0
        assert off.any() and (~off).any()
        # outputs of a routed-out unit never reach the loss ...
        np.testing.assert_array_equal(np.asarray(kernel_grad)[..., off], 0.0)
        assert np.abs(np.asarray(kernel_grad)[..., ~off]).sum() > 0
        # ... and the next layer's weights reading that unit see zero input
        if layer + 1 < len(kernels):
            np.testing.assert_array_equal(np.asarray(kernels[layer + 1])[..., off, :], 0.0)


def test_wrong_input_rank_is_an_error():
    m = models.SmallCNN(num_tasks=3, sharing=0.5)
    with pytest.raises(ValueError, match=r"rank 4 .*\(B, H, W, C\)"):
        m.init(KEYS, jnp.ones((8, 8, 1)), 0)


def test_routed_model_refuses_task_none_and_names_the_helper():
    m = models.SmallCNN(num_tasks=3, sharing=0.5)
    with pytest.raises(ValueError, match="apply_all_tasks"):
        m.init(KEYS, jnp.ones((1, 8, 8, 1)))

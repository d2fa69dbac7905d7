"""tr_jax.nn.conv: every lowering equals flax.linen.Conv (forward and gradients), float32 and
float64, over map sizes 1x1 .. 9x9 (incl. 2x2), kernels, strides and paddings (winograd: the
3x3 stride-1 cases); forward-mode and nested derivatives; the "auto" choice (by map size and
dtype) and its overrides; argument errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tr_jax.nn import conv as conv_lib
from tr_jax.nn import winograd

LOWERINGS = ("xla", "im2col", "winograd")
# (input H, W), kernel, strides, padding
CASES = [
    ((1, 1), (3, 3), (1, 1), "SAME"),
    ((2, 2), (3, 3), (1, 1), "SAME"),
    ((2, 2), (1, 1), (1, 1), "VALID"),
    ((4, 4), (3, 3), (1, 1), "SAME"),
    ((5, 7), (3, 3), (2, 2), "SAME"),
    ((6, 6), (1, 1), (2, 2), "VALID"),
    ((9, 9), (3, 3), (1, 1), "VALID"),
    ((7, 5), (2, 3), (2, 1), ((2, 0), (1, 1))),
    ((4, 4), (7, 7), (2, 2), "SAME"),
    ((3, 3), (3, 3), (1, 1), 1),
    ((8, 8), (3, 3), (1, 1), "SAME_LOWER"),
    ((5, 6), (3, 3), (1, 1), ((2, 0), (0, 1))),
]


def _lowerings(kernel, strides):
    """The lowerings that compute this convolution (winograd: 3x3 stride 1 only)."""
    return [low for low in LOWERINGS
            if low != "winograd" or conv_lib.winograd_applies(kernel, strides)]


def _loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x)))


def _compare_all_cases(cases, dtype, rtol, atol, grad_rtol):
    """One jit over the cases and lowerings: value and gradients (params and x) of each tr_jax
    lowering against flax.linen.Conv with the same parameters (odd cases without bias)."""
    runs = []
    for i, (hw, kernel, strides, padding) in enumerate(cases):
        use_bias = i % 2 == 0
        x = jax.random.normal(jax.random.key(i), (2, *hw, 5), dtype)
        ref = nn.Conv(4, kernel, strides, padding, use_bias=use_bias, param_dtype=dtype)
        params = ref.init(jax.random.key(100 + i), x)["params"]
        if use_bias:  # a non-zero bias, so that its gradient path is exercised
            params = {**params, "bias": jax.random.normal(jax.random.key(200 + i), (4,), dtype)}
        mine = {low: conv_lib.Conv(4, kernel, strides, padding, use_bias=use_bias,
                                   param_dtype=dtype, lowering=low)
                for low in _lowerings(kernel, strides)}
        runs.append((f"case {cases[i]} bias={use_bias}", ref, mine, params, x))

    @jax.jit
    def evaluate(inputs):
        out = []
        for (_, ref, mine, _, _), (params, x) in zip(runs, inputs):
            modules = {"flax": ref, **mine}
            out.append({name: (m.apply({"params": params}, x),
                               jax.grad(lambda p, x, m=m: _loss(m, p, x), argnums=(0, 1))(
                                   params, x))
                        for name, m in modules.items()})
        return out

    results = evaluate([(params, x) for _, _, _, params, x in runs])
    for (label, _, mine, _, _), res in zip(runs, results):
        y_ref, g_ref = res["flax"]
        for low in mine:
            y, g = res[low]
            assert y.dtype == dtype, label
            np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=atol, err_msg=f"{label} {low}")
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
                np.testing.assert_allclose(a, b, rtol=grad_rtol, atol=atol,
                                           err_msg=f"{label} {low} grad")


def test_matches_flax_conv_float32():
    _compare_all_cases(CASES, jnp.float32, rtol=1e-5, atol=1e-5, grad_rtol=1e-4)


def test_matches_flax_conv_float64(x64):
    _compare_all_cases(CASES[1:6], jnp.float64, rtol=1e-12, atol=1e-12, grad_rtol=1e-11)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_forward_mode_and_nested_derivatives_match_flax(dtype, x64):
    """jvp and forward-over-forward (what tr_jax.affinity.estimators run) of each lowering,
    along parameter and input directions, equal flax.linen.Conv's (a 3x3 stride-1 layer, so
    that winograd's custom JVP is exercised)."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5), dtype)
    ref = nn.Conv(4, (3, 3), param_dtype=dtype)
    params = ref.init(jax.random.key(1), x)["params"]
    dp = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)
    dx = jax.random.normal(jax.random.key(3), x.shape, dtype)

    def derivatives(module):
        loss = functools.partial(_loss, module)
        first = jax.jvp(loss, (params, x), (dp, dx))[1]
        nested = jax.jvp(lambda p: jax.jvp(lambda q: loss(q, x), (p,), (dp,))[1],
                         (params,), (dp,))[1]
        return first, nested

    want = jax.jit(lambda: derivatives(ref))()
    rtol = 1e-4 if dtype == jnp.float32 else 1e-11
    for low in LOWERINGS:
        got = jax.jit(lambda low=low: derivatives(
            conv_lib.Conv(4, (3, 3), param_dtype=dtype, lowering=low)))()
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=low)


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("hw, pads", [
    ((6, 5), ((1, 1), (1, 1))), ((6, 5), ((0, 0), (2, 1))), ((6, 5), ((3, 0), (0, 2))),
    ((6, 5), ((0, 1), (1, 0))), ((6, 5), ((0, 3), (1, 4))), ((6, 5), ((-1, 2), (1, -1))),
    ((3, 3), ((0, 0), (0, 0))), ((1, 1), ((1, 1), (1, 1))), ((9, 10), ((1, 1), (1, 1)))])
def test_winograd_value_and_gradients_are_the_direct_convolutions(hw, pads, tile, x64):
    """With either tile, winograd_forward, input_gradient (the transposed convolution with the
    flipped kernel) and kernel_gradient (input tiles against the spread cotangent tiles) equal
    the direct convolution and its VJP in x and in the kernel, in float64: odd map sizes and
    partial tiles, a 1x1 output, pads over 2 (cropped in the transposed convolution) and
    negative pads included."""
    x = jax.random.normal(jax.random.key(0), (2, *hw, 4), jnp.float64)
    k = jax.random.normal(jax.random.key(1), (3, 3, 4, 3), jnp.float64)
    y, vjp = jax.vjp(functools.partial(conv_lib.conv2d, padding=pads, lowering="xla"), x, k)
    ct = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
    want_x, want_k = vjp(ct)
    tol = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(winograd.winograd_forward(x, k, pads, tile), y, **tol)
    np.testing.assert_allclose(winograd.input_gradient(ct, k, pads, tile), want_x, **tol)
    np.testing.assert_allclose(winograd.kernel_gradient(x, ct, pads, tile), want_k, **tol)


@pytest.mark.parametrize("tile", winograd.TILES)
def test_winograd_derivatives_under_vmap_and_nesting(tile, x64):
    """The winograd lowering's input and kernel gradients are written as linear transposes
    inside its custom JVP: with either tile, under vmap over kernels, inputs or both,
    reverse-over-reverse, forward-over-reverse and forward-over-forward along the input and
    along the kernel (which evaluate those transposes), derivatives equal the direct
    convolution's (float64)."""
    xs = jax.random.normal(jax.random.key(0), (2, 2, 5, 6, 4), jnp.float64)
    kernels = jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 2), jnp.float64)
    pads = ((1, 1), (0, 2))
    convs = {"xla": functools.partial(conv_lib.conv2d, padding=pads, lowering="xla"),
             "winograd": functools.partial(winograd.winograd_conv, pads=pads, tile=tile)}

    def derivatives(lowering):
        loss = lambda x, k: jnp.sum(jnp.sin(convs[lowering](x, k)) ** 2)
        grads = jax.grad(loss, argnums=(0, 1))
        x, k = xs[0], kernels[0]
        per_kernel = jax.vmap(grads, in_axes=(None, 0))(x, kernels)
        per_input = jax.vmap(grads, in_axes=(0, None))(xs, k)
        per_pair = jax.vmap(grads)(xs, kernels)
        rev_rev = (jax.grad(lambda k: jnp.sum(grads(x, k)[0] ** 2))(k),
                   jax.grad(lambda x: jnp.sum(grads(x, k)[1] ** 2))(x))
        fwd_rev = (jax.jvp(lambda x: grads(x, k), (x,), (xs[1],))[1],
                   jax.jvp(lambda k: grads(x, k), (k,), (kernels[1],))[1])
        first = lambda x, k: jax.jvp(loss, (x, k), (xs[1], kernels[1]))[1]
        fwd_fwd = (jax.jvp(lambda x: first(x, k), (x,), (xs[1],))[1],
                   jax.jvp(lambda k: first(x, k), (k,), (kernels[1],))[1])
        return per_kernel, per_input, per_pair, rev_rev, fwd_rev, fwd_fwd

    want = jax.jit(lambda: derivatives("xla"))()
    got = jax.jit(lambda: derivatives("winograd"))()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_params_match_flax_conv():
    x = jnp.ones((1, 4, 4, 3))
    for use_bias in (True, False):
        ref = nn.Conv(8, (3, 3), use_bias=use_bias).init(jax.random.key(0), x)
        mine = conv_lib.Conv(8, (3, 3), use_bias=use_bias).init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, ref)
        jax.tree.map(np.testing.assert_array_equal, mine, ref)


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_vmapped_kernels_match_per_kernel_calls(lowering):
    """A per-task kernel under vmap (the TAG lookahead) equals one call per kernel."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4))
    kernels = jax.random.normal(jax.random.key(1), (5, 3, 3, 4, 6))
    batched = jax.jit(jax.vmap(lambda k: conv_lib.conv2d(x, k, lowering=lowering)))(kernels)
    for t in range(5):
        np.testing.assert_allclose(batched[t], conv_lib.conv2d(x, kernels[t], lowering="xla"),
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture
def auto_env(monkeypatch):
    """Clears ``TR_JAX_CONV_LOWERING`` for the test, so that "auto" decides by itself."""
    monkeypatch.delenv(conv_lib.ENV_VAR, raising=False)


def test_auto_picks_im2col_for_small_maps_on_cpu(auto_env):
    """2x2 and 3x3 maps, thin maps, and maps up to IM2COL_MAX_AREA that winograd does not
    compute."""
    for hw in ((2, 2), (3, 3), (3, 5), (1, 16)):
        assert conv_lib.resolve_lowering("auto", (32, *hw, 8), (3, 3, 8, 8)) == "im2col", hw
    side = int(np.sqrt(conv_lib.IM2COL_MAX_AREA))
    assert conv_lib.resolve_lowering("auto", (32, side, side, 8), (1, 1, 8, 8)) == "im2col"
    # the output map decides: a stride-2 conv on an 8x8 map has a 4x4 output
    assert conv_lib.resolve_lowering("auto", (32, 8, 8, 8), (3, 3, 8, 8), (2, 2)) == "im2col"
    assert conv_lib.resolve_lowering("auto", (32, 8, 8, 8), (3, 3, 8, 8), 2) == "im2col"


def test_auto_picks_winograd_for_3x3_stride_1_from_4x4_to_16x16_maps_on_cpu(auto_env):
    """Winograd needs at least WINOGRAD_MIN_CIN input channels too (xla or im2col below)."""
    side, c = int(np.sqrt(conv_lib.WINOGRAD_MAX_AREA)), conv_lib.WINOGRAD_MIN_CIN
    for hw in ((4, 4), (4, 5), (8, 8), (side, side), (4, conv_lib.WINOGRAD_MAX_AREA // 4)):
        assert conv_lib.resolve_lowering("auto", (32, *hw, c), (3, 3, c, 8)) == "winograd", hw
    assert conv_lib.resolve_lowering("auto", (32, side, side, c - 1), (3, 3, c - 1, 8)) == "xla"
    assert conv_lib.resolve_lowering("auto", (32, 4, 4, c - 1), (3, 3, c - 1, 8)) == "im2col"
    assert conv_lib.resolve_lowering("auto", (32, 2, 20, c), (3, 3, c, 8)) == "xla"
    assert conv_lib.resolve_lowering("auto", (32, 2 * side, 2 * side, c), (3, 3, c, 8)) == "xla"
    assert conv_lib.resolve_lowering("auto", (32, side, side, c), (1, 1, c, 8)) == "xla"
    assert conv_lib.resolve_lowering("auto", (32, 2 * side, 2 * side, c), (3, 3, c, 8),
                                     (2, 2)) == "xla"


def test_winograd_default_tile_is_4_from_8x8_outputs():
    for out_hw, tile in (((4, 4), 2), ((7, 9), 2), ((8, 8), 4), ((8, 30), 4), ((32, 32), 4)):
        assert winograd.default_tile(out_hw) == tile, out_hw


def test_auto_leaves_winograd_to_float32_and_float64(auto_env):
    """bfloat16 and float16 lose accuracy in Winograd's transforms: "auto" gives them "xla"
    where float32 gets "winograd" (small maps stay "im2col" whatever the dtype)."""
    c = conv_lib.WINOGRAD_MIN_CIN
    shape, kernel = (32, 8, 8, c), (3, 3, c, 8)
    for dtype in (jnp.float32, jnp.float64):
        assert conv_lib.resolve_lowering("auto", shape, kernel, dtype=dtype) == "winograd"
    for dtype in (jnp.bfloat16, jnp.float16):
        assert conv_lib.resolve_lowering("auto", shape, kernel, dtype=dtype) == "xla"
        for hw in (2, 4):
            assert conv_lib.resolve_lowering("auto", (32, hw, hw, c), kernel,
                                             dtype=dtype) == "im2col"


def test_conv2d_auto_runs_xla_for_bfloat16_mid_maps(auto_env):
    """conv2d decides with x's dtype: a bfloat16 8x8 map gets exactly the "xla" result (the
    winograd one rounds differently)."""
    c = conv_lib.WINOGRAD_MIN_CIN
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, c), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (3, 3, c, 8), jnp.bfloat16)
    assert not np.array_equal(conv_lib.conv2d(x, k, lowering="winograd"),
                              conv_lib.conv2d(x, k, lowering="xla"))
    np.testing.assert_array_equal(conv_lib.conv2d(x, k), conv_lib.conv2d(x, k, lowering="xla"))


def test_auto_is_xla_off_cpu(auto_env, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_lib.resolve_lowering("auto", (32, 2, 2, 512), (3, 3, 512, 512)) == "xla"


def test_env_var_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv(conv_lib.ENV_VAR, "xla")
    assert conv_lib.resolve_lowering("auto", (32, 2, 2, 8), (3, 3, 8, 8)) == "xla"
    assert conv_lib.resolve_lowering("im2col", (32, 2, 2, 8), (3, 3, 8, 8)) == "im2col"
    monkeypatch.setenv(conv_lib.ENV_VAR, "IM2COL")
    assert conv_lib.resolve_lowering("auto", (32, 64, 64, 8), (3, 3, 8, 8)) == "im2col"
    monkeypatch.setenv(conv_lib.ENV_VAR, "winograd")  # where it applies; "auto" elsewhere
    assert conv_lib.resolve_lowering("auto", (32, 64, 64, 8), (3, 3, 8, 8)) == "winograd"
    assert conv_lib.resolve_lowering("auto", (32, 2, 2, 8), (1, 1, 8, 8)) == "im2col"
    assert conv_lib.resolve_lowering("auto", (32, 64, 64, 8), (3, 3, 8, 8), (2, 2)) == "xla"
    monkeypatch.setenv(conv_lib.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=conv_lib.ENV_VAR):
        conv_lib.resolve_lowering("auto", (32, 2, 2, 8), (3, 3, 8, 8))


def test_skip_winograd_keeps_auto_and_the_env_var_off_winograd(auto_env, monkeypatch):
    """Inside the block "auto" gives what it would without Winograd (xla, or im2col on small
    maps); an explicit choice is kept, and leaving the block restores "winograd"."""
    c = conv_lib.WINOGRAD_MIN_CIN
    cases = {(32, 8, 8, c): "xla", (32, 4, 4, c): "im2col"}
    for shape, inside in cases.items():
        kernel = (3, 3, c, 8)
        with conv_lib.skip_winograd():
            assert conv_lib.resolve_lowering("auto", shape, kernel) == inside, shape
            assert conv_lib.resolve_lowering("winograd", shape, kernel) == "winograd"
            monkeypatch.setenv(conv_lib.ENV_VAR, "winograd")
            assert conv_lib.resolve_lowering("auto", shape, kernel) == inside, shape
            monkeypatch.delenv(conv_lib.ENV_VAR)
        assert conv_lib.resolve_lowering("auto", shape, kernel) == "winograd", shape


def test_bad_arguments_raise_clear_errors():
    x, k = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
    with pytest.raises(ValueError, match="lowering"):
        conv_lib.conv2d(x, k, lowering="cudnn")
    with pytest.raises(ValueError, match="matching Cin"):
        conv_lib.conv2d(x, jnp.ones((3, 3, 5, 2)))
    with pytest.raises(ValueError, match="one dtype; got bfloat16 and float32"):
        conv_lib.conv2d(x.astype(jnp.bfloat16), k, lowering="winograd")
    with pytest.raises(ValueError, match="does not fit"):
        conv_lib.im2col_conv(jnp.ones((1, 2, 2, 3)), jnp.ones((5, 5, 3, 2)), padding="VALID")
    with pytest.raises(ValueError, match="3x3 stride-1"):
        conv_lib.conv2d(x, k, (2, 2), lowering="winograd")
    with pytest.raises(ValueError, match="does not fit"):
        conv_lib.conv2d(jnp.ones((1, 1, 1, 3)), k, padding="VALID", lowering="winograd")
    with pytest.raises(ValueError, match="padding"):
        conv_lib.conv2d(x, k, padding=((1, 1), (1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"padded map \(1, 1\) is smaller than the 3x3"):
        winograd.winograd_conv(jnp.ones((1, 1, 1, 3)), k, ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"tile=3 is not one of \(2, 4\)"):
        winograd.winograd_conv(x, k, ((1, 1), (1, 1)), tile=3)


@pytest.mark.parametrize("lowering", LOWERINGS + ("auto",))
def test_a_kernel_larger_than_the_padded_map_raises_for_every_lowering(lowering):
    """No lowering returns an empty (B, 0, 0, Cout) map: conv2d checks the fit first."""
    with pytest.raises(ValueError, match=r"kernel \(3, 3\) .* does not fit the map \(2, 2\)"):
        conv_lib.conv2d(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 2)), padding="VALID",
                        lowering=lowering)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strides=(0, 0)), r"strides=\(0, 0\) must be a positive int n"),
    (dict(strides=(1, 2, 1)), r"strides=\(1, 2, 1\) must be a positive int"),
    (dict(strides="2"), r"strides='2' must be a positive int"),
    (dict(strides=1.5), r"strides=1.5 must be a positive int"),
    (dict(padding=((1, 1), (1,))), r"padding\[1\]=\(1,\) must be an int n"),
    (dict(padding=(1.0, 1)), r"padding\[0\]=1.0 must be an int n"),
    (dict(padding=(1, 1, 1)), "must describe the 2 spatial dims"),
    (dict(padding="FULL"), r"padding='FULL' is unknown; use one of \('SAME', 'SAME_LOWER'"),
])
def test_malformed_strides_and_padding_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv_lib.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2)), **kwargs)


def test_int_strides_kernel_size_and_numpy_int_padding():
    """An int n means (n, n), NumPy ints and 0-d int arrays included, as for flax's 2-D
    windows."""
    x, k = jax.random.normal(jax.random.key(0), (1, 5, 5, 3)), jnp.ones((3, 3, 3, 2))
    want = conv_lib.conv2d(x, k, (2, 2), ((1, 1), (1, 1)), lowering="xla")
    for strides, padding in ((2, 1), (np.int64(2), np.int64(1)), ((2, 2), (np.int32(1), 1)),
                             (np.array(2), np.array(1))):
        np.testing.assert_array_equal(
            conv_lib.conv2d(x, k, strides, padding, lowering="xla"), want)
    module = conv_lib.Conv(2, kernel_size=np.int64(3), strides=2, padding=1, lowering="xla")
    params = module.init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (3, 3, 3, 2)
    with pytest.raises(ValueError, match="kernel_size=0 must be a positive int"):
        conv_lib.Conv(2, kernel_size=0).init(jax.random.key(0), x)

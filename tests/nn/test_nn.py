"""Functional layers against hand computations; shapes; jit/vmap over a task axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_hbmeta import nn


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def numpy_correlate2d(x, w, stride, pad):
    """Direct loops: y[n,i,j,o] = Σ_{u,v,c} xpad[n, s·i+u, s·j+v, c] w[u,v,c,o]."""
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    k_h, k_w, _, c_out = w.shape
    out_h = (x.shape[1] - k_h) // stride + 1
    out_w = (x.shape[2] - k_w) // stride + 1
    y = np.zeros((x.shape[0], out_h, out_w, c_out))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, stride * i:stride * i + k_h, stride * j:stride * j + k_w, :]
            y[:, i, j, :] = np.einsum("nuvc,uvco->no", patch, w)
    return y


def test_dense_hand_computation():
    params = {"w": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": np.array([0.5, -1.0])}
    x = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    np.testing.assert_allclose(nn.dense(params, x), [[-3.5, -5.0], [5.5, 7.0]])
    with pytest.raises(ValueError, match=r"expected inputs \(\.\.\., 3\)"):
        nn.dense(params, np.ones((2, 4)))


@pytest.mark.parametrize(("stride", "padding", "pad"), [
    (1, "SAME", ((1, 1), (1, 1))),
    (2, "VALID", ((0, 0), (0, 0))),
    (2, ((1, 0), (0, 2)), ((1, 0), (0, 2))),
])
def test_conv2d_matches_direct_correlation(stride, padding, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 7, 3))
    params = {"w": rng.normal(size=(3, 3, 3, 4)), "b": rng.normal(size=(4,))}
    expected = numpy_correlate2d(x, params["w"], stride, pad) + params["b"]
    got = nn.conv2d(params, x, stride=stride, padding=padding)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_single_channel_is_numpy_correlate_and_keeps_batch_axes():
    x = np.zeros((1, 1, 5, 1))
    x[0, 0, :, 0] = [1.0, 2.0, 3.0, 4.0, 5.0]
    kernel = np.array([1.0, 0.0, -2.0])
    got = nn.conv2d({"w": kernel.reshape(1, 3, 1, 1)}, x, padding="VALID")
    np.testing.assert_allclose(got[0, 0, :, 0], np.correlate(x[0, 0, :, 0], kernel, "valid"))
    batched = nn.conv2d({"w": kernel.reshape(1, 3, 1, 1)}, np.broadcast_to(x, (2, 3, 1, 5, 1)),
                        padding="VALID")
    assert batched.shape == (2, 3, 1, 3, 1)


def test_max_pool_floors_odd_sizes():
    x = np.arange(2 * 5 * 5 * 1, dtype=np.float64).reshape(2, 5, 5, 1)
    expected = x[:, :4, :4].reshape(2, 2, 2, 2, 2, 1).max((2, 4))
    np.testing.assert_array_equal(nn.max_pool(x), expected)


def test_mlp_sinusoid_net_shapes_and_forward():
    params = nn.init_mlp(jax.random.PRNGKey(0), (1, 40, 40, 1))
    assert nn.param_shapes(params) == {
        "dense_0": {"w": (1, 40), "b": (40,)},
        "dense_1": {"w": (40, 40), "b": (40,)},
        "dense_2": {"w": (40, 1), "b": (1,)},
    }
    assert nn.num_params(params) == 1761 and nn.mlp_sizes(params) == (1, 40, 40, 1)
    assert params["dense_0"]["w"].dtype == jnp.float64
    np.testing.assert_allclose(np.std(params["dense_1"]["w"]) * np.sqrt(40), 1.0, rtol=0.1)
    x = np.linspace(-5, 5, 10)[:, None]
    output = jax.jit(nn.mlp)(params, x)
    np.testing.assert_allclose(output, numpy_mlp(params, x), rtol=1e-12)


def numpy_mlp(params, x):
    for layer in range(len(params)):
        x = x @ params[f"dense_{layer}"]["w"] + params[f"dense_{layer}"]["b"]
        x = np.maximum(x, 0.0) if layer < len(params) - 1 else x
    return x


def test_mlp_jit_vmap_over_task_axis_of_parameters():
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    params = jax.vmap(lambda key: nn.init_mlp(key, (1, 8, 1)))(keys)
    assert params["dense_0"]["w"].shape == (3, 1, 8)
    assert not np.allclose(params["dense_0"]["w"][0], params["dense_0"]["w"][1])
    x = np.random.default_rng(3).normal(size=(3, 5, 1))
    batched = jax.jit(jax.vmap(nn.mlp))(params, x)
    for task in range(3):
        single = jax.tree.map(lambda leaf, t=task: np.asarray(leaf[t]), params)
        np.testing.assert_allclose(batched[task], numpy_mlp(single, x[task]), atol=1e-12)
    with pytest.raises(ValueError, match="dense_0"):
        nn.mlp({"layer": params["dense_0"]}, x)


def test_conv4_shapes_variants_and_task_vmap():
    params = nn.init_conv4(jax.random.PRNGKey(4), 5, filters=8)
    assert params["head"]["w"].shape == (8, 5)  # 28 → 14 → 7 → 3 → 1
    assert params["conv_1"]["w"].shape == (3, 3, 8, 8)
    affine = {name: ({"w": block["w"], "scale": np.full(8, 2.0), "offset": np.full(8, -0.1)}
                     if name != "head" else block) for name, block in params.items()}
    biased = {name: ({"w": block["w"] * 2.0, "b": np.full(8, -0.1)}
                     if name != "head" else block) for name, block in params.items()}
    tasks = jax.tree.map(lambda leaf: np.stack([leaf, 0.5 * leaf]), affine)
    x = np.random.default_rng(5).uniform(size=(2, 4, 28, 28, 1))

    @jax.jit
    def compute(affine, biased, tasks):
        return nn.conv4(affine, x), nn.conv4(biased, x), jax.vmap(nn.conv4)(tasks, x)

    logits, logits_biased, per_task = compute(affine, biased, tasks)
    assert logits.shape == (2, 4, 5) and per_task.shape == (2, 4, 5)
    # scale·(x∗w) + offset is the conv with kernel scale·w and bias offset
    np.testing.assert_allclose(logits, logits_biased, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(per_task[0], logits[0], rtol=1e-10, atol=1e-12)
    shapes = jax.eval_shape(lambda key: nn.init_conv4(key, 5, filters=8, affine=True),
                            jax.random.PRNGKey(0))
    assert set(shapes["conv_0"]) == {"w", "scale", "offset"}
    strided = jax.eval_shape(lambda key: nn.init_conv4(key, 3, filters=4, pool=False,
                                                       image_size=(84, 84), channels=3),
                             jax.random.PRNGKey(0))
    assert strided["head"]["w"].shape == (6 * 6 * 4, 3)  # 84 → 42 → 21 → 11 → 6
    out = jax.eval_shape(lambda p: nn.conv4(p, np.zeros((2, 84, 84, 3)), pool=False), strided)
    assert out.shape == (2, 3)

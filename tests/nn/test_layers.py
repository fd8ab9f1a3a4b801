"""conv2d_layer: the convolution it computes, and its K-FAC (KFC) factors against the exact
Fisher of a one-output-channel linear-Gaussian convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta import nn
from numpyro_hbmeta.curvature import KFAC
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.nn.layers import conv2d_layer

SIGMA = 0.5
KERNEL = (2, 3)
C_IN = 2


@pytest.mark.parametrize(("padding", "stride"),
                         [("SAME", 1), ("VALID", 2), (((1, 0), (2, 1)), (2, 1))])
def test_conv2d_layer_is_the_convolution(x64, padding, stride):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 6, C_IN))
    w = rng.normal(size=(2, *KERNEL, C_IN, 4))
    b = rng.normal(size=(2, 4))
    batched = conv2d_layer("conv", x, w, b, stride=stride, padding=padding)
    per_task = np.stack([nn.conv2d({"w": w[t], "b": b[t]}, x[t], stride=stride,
                                   padding=padding) for t in range(2)])
    np.testing.assert_allclose(batched, per_task, atol=1e-12)
    shared = conv2d_layer("conv", x[0], w[0], b[0], stride=stride, padding=padding)
    np.testing.assert_allclose(shared, per_task[0], atol=1e-12)


def test_conv2d_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"conv2d_layer 'c'.*\(\.\.\., H, W, 3\)"):
        conv2d_layer("c", jnp.ones((2, 5, 5, 1)), jnp.ones((2, 3, 3, 3, 4)))
    with pytest.raises(ValueError, match=r"conv2d_layer 'c': expected a kernel"):
        conv2d_layer("c", jnp.ones((2, 5, 5, 1)), jnp.ones((3, 3, 1)))


def conv_net(x, y=None):
    """One task-specific convolution, one output channel, every location observed."""
    kernel = (*KERNEL, C_IN, 1)
    theta_w = numpyro.sample("theta_w", dist.Normal(0.0, 1.0).expand(kernel).to_event(4))
    theta_b = numpyro.sample("theta_b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-1):
        w = numpyro.sample("w", dist.Normal(theta_w, 1.0).to_event(4))  # (tasks, 2, 3, 2, 1)
        b = numpyro.sample("b", dist.Normal(theta_b, 1.0).to_event(1))  # (tasks, 1)
        mean = conv2d_layer("conv", x, w, b, padding="VALID")[..., 0]  # (tasks, n, H', W')
        numpyro.sample("y", dist.Normal(mean, SIGMA).to_event(3), obs=y)


def numpy_patches(x):
    """ā per location by loops, in Φ's layout [w (k_h, k_w, c_in) row-major, b]."""
    tasks, n, height, width, _ = x.shape
    rows = []
    for i in range(height - KERNEL[0] + 1):
        for j in range(width - KERNEL[1] + 1):
            window = x[:, :, i:i + KERNEL[0], j:j + KERNEL[1], :].reshape(tasks, n, -1)
            rows.append(np.concatenate([window, np.ones((tasks, n, 1))], -1))
    return np.stack(rows, 2).reshape(tasks, -1, rows[0].shape[-1])  # (tasks, n·T, p)


def test_kfac_of_a_one_channel_convolution_is_its_exact_fisher(x64):
    # One output channel with Gaussian noise at every location: the output Fisher is 1/σ² at
    # every point (n images × T locations), so K-FAC's A ⊗ G (and KFC's SUD assumption,
    # which drops cross-location terms that are zero here) is exactly Σ ā āᵀ / σ². The
    # patches are cut by loops, so this checks the patch order and the kernel reordering.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 5, 6, C_IN))
    y = rng.normal(size=(3, 2, 4, 4))
    params = {"theta_w": rng.normal(size=(*KERNEL, C_IN, 1)), "theta_b": rng.normal(size=(1,))}
    context = context_at(conv_net, params, {"x": x, "y": y})
    damping = 0.1

    @jax.jit
    def pieces(phi):
        c = KFAC(damping=damping)(None, phi, context.observations(conv_net, {"x": x, "y": y}))
        return c.logdet(), c.dense()

    logdet, dense = pieces(context.phi0 + 0.3)
    a_bar = numpy_patches(x)
    expected = np.einsum("tni,tnj->tij", a_bar, a_bar) / SIGMA**2 + damping * np.eye(13)
    np.testing.assert_allclose(dense, expected, atol=1e-9)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(expected)[1], atol=1e-8)


def test_llama_kfac_on_a_convolution_equals_the_full_hessian(x64):
    # Linear-Gaussian in φ: the full Hessian of the query NLL is the same Fisher, so the two
    # llama objectives agree (δ = 0 for both).
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(size=(3, 2, 5, 6, C_IN)), "y": rng.normal(size=(3, 2, 4, 4))}
    params = {"theta_w": rng.normal(size=(*KERNEL, C_IN, 1)), "theta_b": rng.normal(size=(1,))}
    inner = hbm.TruncatedGD(2, 0.01)
    values = []
    for curvature in (KFAC(damping=0.0), "full"):
        marginal = hbm.meta_marginal(conv_net, inner=inner, objective="llama",
                                     curvature=curvature)
        objective = jax.jit(lambda p, m=marginal: numpyro.infer.util.log_density(
            m, (data, data), {}, p)[1]["hbm_objective"]["fn"].log_factor.reshape(-1))
        values.append(objective(params))
    np.testing.assert_allclose(values[0], values[1], atol=1e-8)

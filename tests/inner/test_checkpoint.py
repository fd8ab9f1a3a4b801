"""TruncatedGD(checkpoint=True): two-level (√K) checkpointing of the inner loop.

Same iterates, diagnostics and meta-gradients as the plain loop, and temporary memory of the
compiled second-order meta-gradient that grows like √K instead of K.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm

NUM_TASKS, DIM = 3, 5


def explicit_loss(theta, x, y):
    """A non-linear per-task loss that closes over θ: Σ_n (tanh(x_n·φ) − y_n)² + ½‖φ − θ‖²."""
    def loss(phi):
        residuals = jnp.tanh(jnp.einsum("jnd,jd->jn", x, phi)) - y
        return jnp.sum(residuals**2, -1) + 0.5 * jnp.sum((phi - theta) ** 2, -1)
    return loss


def assert_same(checkpointed, plain, name=""):
    """Equal booleans and integers; floats equal to rounding (bitwise on CPU, where this was
    measured; 1e-14 leaves room for a backend that fuses the two loop bodies differently)."""
    checkpointed, plain = np.asarray(checkpointed), np.asarray(plain)
    if np.issubdtype(plain.dtype, np.floating):
        np.testing.assert_allclose(checkpointed, plain, rtol=1e-14, atol=0, err_msg=name)
    else:
        np.testing.assert_array_equal(checkpointed, plain, err_msg=name)


@pytest.fixture
def regression(x64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(NUM_TASKS, 8, DIM)))
    y = jnp.asarray(rng.normal(size=(NUM_TASKS, 8)))
    return x, y, jnp.asarray(rng.normal(size=DIM))


@pytest.mark.parametrize("num_steps", [1, 4, 7, 16])
@pytest.mark.parametrize("first_order", [False, True])
def test_checkpointed_loop_gives_the_plain_loops_meta_gradient(regression, num_steps,
                                                              first_order):
    # K = 1 (one segment of one step), 4 (2 × 2), 7 (3 segments of 2, remainder 1), 16 (4 × 4).
    x, y, theta = regression

    def meta(theta, checkpoint):
        inner = hbm.TruncatedGD(num_steps, 0.05, first_order=first_order, checkpoint=checkpoint)
        phi, info = inner.solve(explicit_loss(theta, x, y),
                                jnp.broadcast_to(theta, (NUM_TASKS, DIM)))
        return jnp.sum(jnp.sin(phi)), (phi, info)

    grad = jax.jit(jax.value_and_grad(meta, has_aux=True), static_argnums=1)
    (value, (phi, info)), meta_grad = grad(theta, False)
    (value_c, (phi_c, info_c)), meta_grad_c = grad(theta, True)
    assert_same(phi_c, phi)          # the same steps in the same order
    assert_same(value_c, value)
    for name, plain, checkpointed in zip(info._fields, info, info_c, strict=True):
        assert_same(checkpointed, plain, name)
    np.testing.assert_allclose(meta_grad_c, meta_grad, rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(meta_grad)) > 1e-2       # a gradient that is not trivially zero


def test_checkpointed_loop_keeps_the_divergence_diagnostics(x64):
    # βλ per task 0.5, 2.1, 3 over K = 700 steps (26 segments of 26, remainder 24): the second
    # task's loss rises from step 1, the third overflows to inf; the info must not change.
    curvatures = jnp.array([[0.5], [2.1], [3.0]])
    loss = lambda phi: 0.5 * jnp.sum(curvatures * (phi - 1.0) ** 2, -1)  # noqa: E731
    runs = [jax.jit(hbm.TruncatedGD(700, 1.0, checkpoint=c).solve, static_argnums=0)(
        loss, jnp.zeros((3, 1))) for c in (False, True)]
    (phi, info), (phi_c, info_c) = runs
    assert_same(phi_c, phi)
    for name, plain, checkpointed in zip(info._fields, info, info_c, strict=True):
        assert_same(checkpointed, plain, name)
    assert info_c.diverged.tolist() == [False, True, True]
    assert info_c.diverged_at.tolist() == [0, 1, 1] and (info_c.num_steps == 700).all()


def tanh_model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0).expand([x.shape[-1]]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jnp.tanh(jnp.sum(x * phi, -1)), 0.3), obs=y)


def test_checkpointed_maml_through_the_handler(regression):
    # Second-order MAML on the query set through meta_marginal, K = 7 (not a square).
    x, y, theta = regression
    support, query = {"x": x[:, :4], "y": y[:, :4]}, {"x": x[:, 4:], "y": y[:, 4:]}

    def objective(theta, checkpoint):
        marginal = hbm.meta_marginal(tanh_model, objective="maml",
                                     inner=hbm.TruncatedGD(7, 0.05, checkpoint=checkpoint))
        _, trace = log_density(marginal, (support, query), {}, {"theta": theta})
        return trace["hbm_objective"]["fn"].log_factor.sum()

    grad = jax.jit(jax.value_and_grad(objective), static_argnums=1)
    (value, meta_grad), (value_c, meta_grad_c) = grad(theta, False), grad(theta, True)
    assert_same(value_c, value)
    np.testing.assert_allclose(meta_grad_c, meta_grad, rtol=1e-12, atol=1e-14)


def _meta_gradient_temp_bytes(num_steps: int, checkpoint: bool) -> int | None:
    """Temporary buffers of the compiled second-order meta-gradient (compiled, not run).

    4 tasks × 2000 parameters in float32 (32 kB of state) and an elementwise loss, so the
    per-step state and its residuals dominate what the backward pass keeps.
    """
    rng = np.random.default_rng(0)
    centres = jnp.asarray(rng.normal(size=(4, 2000)), jnp.float32)
    scales = jnp.asarray(rng.uniform(0.5, 1.5, size=(4, 2000)), jnp.float32)
    inner = hbm.TruncatedGD(num_steps, 0.1, checkpoint=checkpoint)

    def meta(theta):
        def loss(phi):
            return jnp.sum(scales * jnp.logaddexp(0.0, phi - centres)
                           + 0.5 * (phi - theta) ** 2, -1)
        phi, _ = inner.solve(loss, jnp.broadcast_to(theta, centres.shape))
        return jnp.sum(jnp.tanh(phi - centres) ** 2)

    compiled = jax.jit(jax.grad(meta)).lower(jnp.zeros(2000, jnp.float32)).compile()
    memory = compiled.memory_analysis()
    return None if memory is None else memory.temp_size_in_bytes


def test_checkpointed_meta_gradient_memory_grows_like_sqrt_k():
    temp = {(k, c): _meta_gradient_temp_bytes(k, c) for k in (16, 64) for c in (False, True)}
    if any(v is None for v in temp.values()):
        pytest.skip(f"compiled.memory_analysis() returned None on the {jax.default_backend()} "
                    "backend: no buffer sizes to compare")
    plain, checkpointed = (temp[64, c] / temp[16, c] for c in (False, True))
    # 4× the steps: the plain loop keeps every step (≈ 4×; 3.8× measured on CPU), √K
    # checkpointing keeps √K states and one segment of √K steps (≈ 2×; 1.8× measured).
    assert plain > 3.4, temp
    assert checkpointed < 2.5, temp
    assert temp[64, True] < 0.4 * temp[64, False], temp

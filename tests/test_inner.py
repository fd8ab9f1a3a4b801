"""Inner solvers against hand-written gradient descent, MAML and Newton."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm

SIGMA = 0.3


def tanh_model(x, y=None):
    """A non-linear task model: y = tanh(x φ) + noise, so second-order terms matter."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0).expand([x.shape[-1]]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jnp.tanh(jnp.sum(x * phi, -1)), SIGMA), obs=y)


def nll(phi, x, y):
    """Hand-written support negative log-likelihood of one task."""
    return -jnp.sum(dist.Normal(jnp.tanh(x @ phi), SIGMA).log_prob(y))


def hand_maml(theta, support, query, *, num_steps, step_size, first_order=False):
    """Σ_j log p(query_j | φ_j^K), with K hand-written GD steps per task from θ."""

    def adapt(x, y):
        phi = theta
        for _ in range(num_steps):
            g = jax.grad(nll)(phi, x, y)
            phi = phi - step_size * (jax.lax.stop_gradient(g) if first_order else g)
        return phi

    phis = jax.vmap(adapt)(support["x"], support["y"])
    return -jnp.sum(jax.vmap(nll)(phis, query["x"], query["y"])), phis


@pytest.fixture
def tanh_data(x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 12, 3))
    true_phi = rng.normal(size=(4, 3))
    y = np.tanh(np.einsum("jnf,jf->jn", x, true_phi)) + SIGMA * rng.normal(size=(4, 12))
    return {"x": x[:, :6], "y": y[:, :6]}, {"x": x[:, 6:], "y": y[:, 6:]}


def handler_maml(theta, support, query, inner):
    marginal = hbm.meta_marginal(tanh_model, inner=inner, objective="maml")
    _, tr = log_density(marginal, (support, query), {}, {"theta": theta})
    return tr["hbm_objective"]["fn"].log_factor.sum(), tr["phi"]["value"][:, 0]


@pytest.mark.parametrize("first_order", [False, True])
def test_truncated_gd_matches_hand_written_maml(tanh_data, first_order):
    support, query = tanh_data
    theta = jnp.array([0.3, -0.2, 0.5])
    inner = hbm.TruncatedGD(4, 0.02, first_order=first_order)

    @jax.jit
    def both(theta):
        mine = jax.value_and_grad(lambda t: handler_maml(t, support, query, inner),
                                  has_aux=True)(theta)
        hand = jax.value_and_grad(
            lambda t: hand_maml(t, support, query, num_steps=4, step_size=0.02,
                                first_order=first_order), has_aux=True)(theta)
        return mine, hand

    ((value, phi), grad), ((hand_value, hand_phi), hand_grad) = both(theta)
    np.testing.assert_allclose(phi, hand_phi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(value, hand_value, rtol=1e-12)
    np.testing.assert_allclose(grad, hand_grad, rtol=1e-10, atol=1e-12)


def test_first_order_gradient_differs_from_second_order(tanh_data):
    support, query = tanh_data
    theta = jnp.array([0.3, -0.2, 0.5])
    grads = [jax.jit(jax.grad(lambda t, fo=fo: handler_maml(
        t, support, query, hbm.TruncatedGD(4, 0.02, first_order=fo))[0]))(theta)
        for fo in (False, True)]
    assert np.max(np.abs(grads[0] - grads[1])) > 1e-3


def test_truncated_gd_pure_solver_and_diagnostics(x64):
    # ℓ_j(φ) = ½ (φ − c_j)ᵀ A (φ − c_j): GD has the closed form c + (I − βA)^K (φ⁰ − c).
    a = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    c = jnp.array([[1.0, -1.0], [0.5, 2.0], [-3.0, 0.0]])
    loss = lambda phi: 0.5 * jnp.einsum("ji,ik,jk->j", phi - c, a, phi - c)  # noqa: E731
    phi0 = jnp.zeros((3, 2))
    phi, info = jax.jit(hbm.TruncatedGD(7, 0.1).solve, static_argnums=0)(loss, phi0)
    contraction = jnp.linalg.matrix_power(jnp.eye(2) - 0.1 * a, 7)
    np.testing.assert_allclose(phi, c + (phi0 - c) @ contraction.T, rtol=1e-12)
    assert info.converged.all() and (info.num_steps == 7).all()
    _, info = hbm.TruncatedGD(3, 1.5).solve(loss, phi0)  # β λ_max > 2: diverges
    assert not info.converged.any()


def test_newton_converges_to_map_and_reports_non_convergence(x64):
    # A smooth strictly convex per-task loss: log-sum-exp plus a quadratic.
    c = jnp.array([[1.0, -2.0], [0.0, 3.0]])
    loss = lambda p: (jax.nn.logsumexp(p * c, -1) + 0.5 * jnp.sum(p**2, -1))  # noqa: E731
    phi, info = jax.jit(hbm.Newton().solve, static_argnums=0)(loss, jnp.zeros((2, 2)))
    grad = jax.grad(lambda p: loss(p).sum())(phi)
    assert np.max(np.abs(grad)) < 1e-12
    assert info.converged.all() and (info.num_steps < 10).all()
    _, info = hbm.Newton(max_steps=1).solve(loss, jnp.zeros((2, 2)))
    assert not info.converged.any()


def test_newton_gradient_is_implicit_function_theorem(x64):
    # φ̂(θ) = argmin ½‖φ − θ‖² + Σ softplus(φ): dφ̂/dθ = (I + diag σ'(φ̂))⁻¹, by the IFT.
    def solve(theta):
        loss = lambda p: 0.5 * jnp.sum((p - theta) ** 2, -1) + jnp.sum(  # noqa: E731
            jax.nn.softplus(p), -1)
        return hbm.Newton().solve(loss, jnp.zeros_like(theta))[0]

    theta = jnp.array([[0.5, -1.0, 2.0]])
    jac = jax.jit(jax.jacobian(solve))(theta)[0, :, 0, :]
    phi = solve(theta)[0]
    curvature = jax.nn.sigmoid(phi) * (1 - jax.nn.sigmoid(phi))
    np.testing.assert_allclose(jac, jnp.diag(1 / (1 + curvature)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": -1, "step_size": 0.1}, "num_steps"),
    ({"num_steps": 2, "step_size": 0.0}, "step_size"),
    ({"num_steps": 2, "step_size": 0.1, "prior": "flat"}, "prior"),
])
def test_truncated_gd_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hbm.TruncatedGD(**kwargs)

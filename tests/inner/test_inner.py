"""Inner solvers against hand-written gradient descent, MAML and Newton."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta import sites
from numpyro_hbmeta.inner import max_eigenvalue, stable_step_size

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


def scaled_quadratic(curvatures, centres):
    """ℓ_j(φ) = ½ Σ_i λ_ji (φ_i − c_ji)²: GD multiplies each error by 1 − βλ_ji per step."""
    return lambda phi: 0.5 * jnp.sum(curvatures * (phi - centres) ** 2, -1)


def test_truncated_gd_flags_exactly_the_tasks_past_the_stability_bound(x64):
    # β = 1, βλ per task: below 1, oscillating but contracting (1.5, 1.9), diverging (2.1, 3).
    beta_lambda = jnp.array([0.5, 1.5, 1.9, 2.1, 3.0])
    curvatures = jnp.stack([beta_lambda, jnp.full(5, 0.5)], -1)
    centres = jnp.ones((5, 2))
    loss = scaled_quadratic(curvatures, centres)
    phi, info = jax.jit(hbm.TruncatedGD(5, 1.0).solve, static_argnums=0)(loss, jnp.zeros((5, 2)))
    np.testing.assert_allclose(phi, centres - (1 - curvatures) ** 5, rtol=1e-12)
    assert info.diverged.tolist() == [False, False, False, True, True]
    assert info.converged.tolist() == [True, True, True, False, False]
    assert info.diverged_at.tolist() == [0, 0, 0, 1, 1]  # the loss rises from the first step
    np.testing.assert_allclose(info.final_loss, loss(phi), rtol=1e-12)
    _, info = hbm.TruncatedGD(5, 0.5).solve(loss, jnp.zeros((5, 2)))  # βλ ≤ 1.5: stable
    assert not info.diverged.any() and info.converged.all()


def test_truncated_gd_flags_a_rise_after_the_loss_fell(x64):
    # Direction 1 (βλ = 1) carries the loss and is solved in one step; direction 2 (βλ = 2.1)
    # starts 1e-3 off and grows by 1.21 per step: the loss falls 50 → 5e-7, then rises, and
    # ends far below the start, so only the per-step test can see it.
    loss = scaled_quadratic(jnp.array([[1.0, 2.1]]), jnp.array([[10.0, 1e-3]]))
    _, info = hbm.TruncatedGD(6, 1.0).solve(loss, jnp.zeros((1, 2)))
    assert float(info.final_loss[0]) < 1e-3 * float(info.loss[0])
    assert info.diverged.tolist() == [True] and info.diverged_at.tolist() == [2]


def test_truncated_gd_flags_overflow_and_stays_quiet_at_the_optimum(x64):
    # βλ = 3 for 700 steps: |1 − βλ|^700 = 2^700 overflows the loss to inf.
    loss = scaled_quadratic(jnp.array([[3.0], [3.0]]), jnp.array([[1.0], [0.0]]))
    _, info = hbm.TruncatedGD(700, 1.0).solve(loss, jnp.zeros((2, 1)))
    assert not np.isfinite(info.final_loss[0]) and info.diverged.tolist() == [True, False]
    assert info.diverged_at[0] == 1 and info.converged.tolist() == [False, True]
    _, info = hbm.TruncatedGD(0, 1.0).solve(loss, jnp.array([[jnp.inf], [0.0]]))
    assert info.diverged.tolist() == [True, False]


def dense_task_hessians(loss, phi):
    """Per-task Hessians from the dense (tasks·d)² Hessian of Σ_j ℓ_j, as a NumPy reference."""
    num_tasks, dim = phi.shape
    dense = np.asarray(jax.jit(jax.hessian(lambda p: loss(p.reshape(phi.shape)).sum()))(
        phi.ravel()))
    return np.stack([dense[j * dim:(j + 1) * dim, j * dim:(j + 1) * dim]
                     for j in range(num_tasks)])


def test_max_eigenvalue_exact_against_numpy(tanh_data):
    support, _ = tanh_data
    phi = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)))
    loss = lambda p: jax.vmap(nll)(p, support["x"], support["y"])  # noqa: E731
    eigenvalues = np.linalg.eigvalsh(dense_task_hessians(loss, phi))
    largest = np.where(np.abs(eigenvalues[:, -1]) >= np.abs(eigenvalues[:, 0]),
                       eigenvalues[:, -1], eigenvalues[:, 0])
    largest_of = jax.jit(max_eigenvalue, static_argnums=0)
    np.testing.assert_allclose(largest_of(loss, phi), largest, rtol=1e-12)
    # Signed: an indefinite block whose largest magnitude is negative.
    quadratic = scaled_quadratic(jnp.array([[1.0, -5.0], [4.0, 2.0]]), jnp.zeros((2, 2)))
    np.testing.assert_allclose(largest_of(quadratic, jnp.ones((2, 2))), [-5.0, 4.0],
                               rtol=1e-14)


def test_max_eigenvalue_power_iteration_against_exact(x64):
    # d = 80 > 64: power iteration. Spectra with λ_2/λ_1 = 0.8, so the Rayleigh quotient's
    # error after 100 iterations is ≲ tan²∠(v⁰, u_1) · 0.8^200 ≈ d · 4e-20: rounding only.
    # The looser 1e-9 allows for the HVP's rounding over 80 terms and a near-orthogonal start.
    rng = np.random.default_rng(0)
    dim, num_tasks = 80, 3
    spectra = rng.uniform(0.1, 0.8, size=(num_tasks, dim))
    spectra[:, 0] = 1.0
    spectra *= np.array([[2.0], [30.0], [0.5]])
    rotations = np.linalg.qr(rng.normal(size=(num_tasks, dim, dim)))[0]
    matrices = np.einsum("jik,jk,jlk->jil", rotations, spectra, rotations)
    loss = lambda p: 0.5 * jnp.einsum("ji,jik,jk->j", p, matrices, p)  # noqa: E731
    phi = jnp.asarray(rng.normal(size=(num_tasks, dim)))
    power = jax.jit(max_eigenvalue, static_argnums=0)(loss, phi)
    exact = jax.jit(max_eigenvalue, static_argnums=0, static_argnames="max_exact_dim")(
        loss, phi, max_exact_dim=dim)
    np.testing.assert_allclose(exact, np.linalg.eigvalsh(matrices)[:, -1], rtol=1e-12)
    np.testing.assert_allclose(power, exact, rtol=1e-9)
    np.testing.assert_allclose(power, [2.0, 30.0, 0.5], rtol=1e-9)


def test_stable_step_size_keeps_gd_contracting(x64):
    curvatures = jnp.array([[50.0, 1.0], [2.0, 0.1]])
    loss = scaled_quadratic(curvatures, jnp.ones((2, 2)))
    lambda_max = jax.jit(max_eigenvalue, static_argnums=0)(loss, jnp.zeros((2, 2)))
    step_size = stable_step_size(lambda_max, margin=0.5)
    np.testing.assert_allclose(step_size, [0.01, 0.25], rtol=1e-14)
    _, info = hbm.TruncatedGD(20, float(step_size.min())).solve(loss, jnp.zeros((2, 2)))
    assert not info.diverged.any()
    with pytest.raises(ValueError, match="margin"):
        stable_step_size(lambda_max, margin=2.5)


def test_handler_reports_divergence_per_task(x64):
    # Linear-Gaussian tasks whose inputs are scaled per task, so the support NLL Hessians
    # XᵀX/σ² differ by the squared scales; β is set between tasks 1 and 2, so β·λ_max is
    # ~0.6 and below for tasks 0-1 and ~6 and above for tasks 2-3.
    from numpyro_hbmeta.infer.implicit_prior import context_at
    from numpyro_hbmeta.models import linear

    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=4, num_support=8, num_query=4)
    scale = jnp.array([0.3, 0.6, 2.0, 3.0])[:, None, None]
    support = {"x": data.support["x"] * scale, "y": data.support["y"]}
    params = {"theta": jnp.array([0.5, -0.5]), "tau": jnp.array(1.0),
              "sigma": jnp.array(0.5)}
    probe = hbm.meta_marginal(linear.model, inner=hbm.TruncatedGD(1, 1.0), objective="maml")

    @jax.jit  # one compile instead of an eager run of every operation
    def largest_eigenvalues(params):
        context = context_at(linear.model, params, support)
        return max_eigenvalue(probe.inner_loss(context, support), context.phi0)

    lambda_max = largest_eigenvalues(params)
    step_size = float(2.0 / jnp.sqrt(lambda_max[1] * lambda_max[2]))
    assert (step_size * lambda_max[:2] < 0.7).all() and (step_size * lambda_max[2:] > 5).all()
    marginal = hbm.meta_marginal(linear.model, inner=hbm.TruncatedGD(5, step_size),
                                 objective="maml")
    names = (sites.INNER_DIVERGED, sites.INNER_CONVERGED, sites.INNER_LOSS,
             sites.INNER_FINAL_LOSS, sites.INNER_NUM_STEPS)

    @jax.jit
    def recorded(params):
        tr = log_density(marginal, (support, data.query), {}, params)[1]
        return [tr[name]["value"] for name in names]

    diverged, converged, start, final, num_steps = map(np.asarray, recorded(params))
    assert diverged.tolist() == (step_size * lambda_max > 2).tolist() == [False] * 2 + [True] * 2
    assert (converged == ~diverged).all() and (num_steps == 5).all()
    assert (final[2:] > 1e6 * start[2:]).all() and (final[:2] < start[:2]).all()

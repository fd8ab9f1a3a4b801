"""The Santos (1996) identity: K GD steps from θ = the MAP under the implicit Gaussian prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.infer.implicit_prior import (
    context_at,
    implicit_precision,
    implicit_prior_variances,
)
from numpyro_hbmeta.models import linear


def test_variances_closed_form_and_small_eigenvalue_limit(x64):
    lam = jnp.array([0.0, 1e-12, 1e-6, 1e-3, 0.5, 5.0, -2.0])
    q = implicit_prior_variances(lam, num_steps=5, step_size=0.1)
    x = 0.1 * lam
    reference = jnp.where(x == 0, 0.5, ((1 - x) ** -5 - 1) / jnp.where(lam == 0, 1.0, lam))
    reference = reference.at[0].set(0.5)  # the limit Kβ
    np.testing.assert_allclose(q[3:], reference[3:], rtol=1e-10)
    np.testing.assert_allclose(q[:3], [0.5, 0.5, 0.5], rtol=1e-5)  # q → Kβ as λ → 0
    assert bool(jnp.all(q > 0))
    assert bool(jnp.isnan(implicit_prior_variances(jnp.array(20.0), num_steps=5,
                                                   step_size=0.1)))


@pytest.mark.parametrize("num_steps,step_size", [(1, 0.01), (5, 0.02), (20, 0.005)])
def test_map_under_implicit_prior_equals_truncated_gd(x64, num_steps, step_size):
    data = linear.simulate(jax.random.PRNGKey(num_steps), num_tasks=5, num_support=6,
                           theta=[0.5, -1.0, 2.0]).support
    # One nearly-dead feature: eigenvalues with λβ ≈ 1e-9, where a naive formula for
    # ((1 − βλ)^(−K) − 1)/λ loses every digit.
    data = {"x": data["x"].at[..., 2].multiply(1e-4), "y": data["y"]}
    params = {"theta": jnp.array([0.1, 0.2, -0.3]), "tau": jnp.array(1.0),
              "sigma": jnp.array(0.8)}
    inner = hbm.TruncatedGD(num_steps, step_size)
    prior = hbm.implicit_prior(linear.model, params, data, inner)
    assert prior.batch_shape == (5,) and prior.event_shape == (3,)
    x, y, sigma = data["x"], data["y"], params["sigma"]
    hessian = jnp.einsum("jnf,jng->jfg", x, x) / sigma**2
    phi0 = prior.loc
    grad0 = jnp.einsum("jnf,jn->jf", x, jnp.einsum("jnf,jf->jn", x, phi0) - y) / sigma**2
    # MAP of ½(φ−φ*)ᵀH(φ−φ*) + ½(φ−φ⁰)ᵀQ⁻¹(φ−φ⁰): φ⁰ − (H + Q⁻¹)⁻¹ ∇ℓ(φ⁰).
    map_ = phi0 - jnp.linalg.solve(hessian + prior.precision_matrix, grad0[..., None])[..., 0]
    marginal = hbm.meta_marginal(linear.model, inner=inner, objective="maml")
    ctx = context_at(linear.model, params, data)
    phi_gd, _ = jax.jit(lambda: marginal.solve(ctx, data))()
    np.testing.assert_allclose(map_, phi_gd, rtol=1e-9, atol=1e-11)
    eigenvalues = jnp.linalg.eigvalsh(hessian)
    assert float(jnp.min(step_size * eigenvalues)) < 1e-8  # the tiny-λβ direction is tested


PARAMS = {"theta": np.zeros(2), "tau": np.array(1.0), "sigma": np.array(0.5)}  # float64


def support_curvatures(support):
    """Largest eigenvalue of XᵀX/σ² per task: the support NLL Hessian of the linear model."""
    x = np.asarray(support["x"])
    return np.linalg.eigvalsh(np.einsum("jnf,jng->jfg", x, x) / PARAMS["sigma"] ** 2)[:, -1]


@pytest.fixture
def scaled_support(x64):
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=4, num_support=7).support
    scale = jnp.array([1.0, 1.5, 0.5, 3.0])[:, None, None]  # λ_max grows with scale²
    return {"x": data["x"] * scale, "y": data["y"]}


def test_implicit_prior_rejects_non_contracting_step(scaled_support):
    lambda_max = support_curvatures(scaled_support)
    step_size = 1.01 / lambda_max[1]  # tasks 1 and 3 have β·λ > 1 (λ_3 ≈ 4 λ_1)
    bad = step_size * lambda_max >= 1
    assert bad.tolist() == [False, True, False, True]
    with pytest.raises(ValueError) as error:
        hbm.implicit_prior(linear.model, PARAMS, scaled_support, hbm.TruncatedGD(5, step_size))
    message = str(error.value)
    assert "step_size must be below 1/λ_max = " in message
    assert "task(s) [1, 3]" in message
    assert f"1/λ_max = {1 / lambda_max[3]:.6g}" in message  # the binding bound
    assert f"largest β·λ = {step_size * lambda_max[3]:.10g}"[:-2] in message


@pytest.mark.parametrize("gap", [1e-4, 1e-9])
def test_implicit_prior_rejects_a_step_just_below_the_bound(scaled_support, gap):
    # β·λ = 1 − gap for task 3 alone: q ≈ gap^(−5)/λ ≥ 1e20, and next to the other
    # direction's q ~ 1 the covariance is not positive definite in float64 (cond > 1/ε).
    lambda_max = support_curvatures(scaled_support)
    step_size = (1 - gap) / lambda_max[3]
    assert (step_size * lambda_max[:3] < 0.5).all()
    with pytest.raises(ValueError, match=r"step_size must be well below 1/λ_max = .* for "
                                         r"task\(s\) \[3\] .*largest β·λ = 0\.9999"):
        hbm.implicit_prior(linear.model, PARAMS, scaled_support, hbm.TruncatedGD(5, step_size))
    # With β·λ = 0.99 it exists (q ≈ 1e10/λ), and GD's MAP identity still holds (above).
    prior = hbm.implicit_prior(linear.model, PARAMS, scaled_support,
                               hbm.TruncatedGD(5, 0.99 / lambda_max[3]))
    np.testing.assert_allclose(np.linalg.eigvalsh(prior.covariance_matrix)[3, -1],
                               (0.01**-5 - 1) / lambda_max[3], rtol=1e-6)


def test_implicit_precision_is_jit_safe_past_the_bound(scaled_support):
    lambda_max = support_curvatures(scaled_support)
    inner = hbm.TruncatedGD(5, 1.01 / lambda_max[1])
    context = context_at(linear.model, PARAMS, scaled_support)
    precision, _ = jax.jit(lambda: implicit_precision(linear.model, context, scaled_support,
                                                      inner))()
    finite = np.all(np.isfinite(precision), (-2, -1))
    assert finite.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"task\(s\) \[1, 3\]"):
        implicit_precision(linear.model, context, scaled_support, inner)


def test_implicit_prior_requires_truncated_gd(linear_data):
    params = {"theta": jnp.zeros(2), "tau": jnp.array(1.0), "sigma": jnp.array(1.0)}
    with pytest.raises(TypeError, match="TruncatedGD"):
        hbm.implicit_prior(linear.model, params, linear_data.support, hbm.Newton())

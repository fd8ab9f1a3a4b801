"""The eight-schools zoo model: data, task axis, closed-form evidence, EB on the boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.models import eight_schools


@pytest.fixture
def data(x64):
    return eight_schools.load_data().support


def test_load_data_is_the_published_table():
    data = eight_schools.load_data()
    assert data.query is None and data.truth is None
    assert data.task_labels == list("ABCDEFGH")
    assert data.support["y"].shape == data.support["sigma"].shape == (8,)
    np.testing.assert_array_equal(data.support["y"], [28, 8, -3, 7, -1, 1, 18, 12])
    np.testing.assert_array_equal(data.support["sigma"], [15, 10, 16, 11, 9, 11, 10, 18])


def test_model_has_one_task_axis_of_eight_schools():
    data = eight_schools.load_data().support
    trace = handlers.trace(handlers.seed(eight_schools.model, 0)).get_trace(**data)
    site = trace["theta_school"]
    assert site["value"].shape == (8,)
    frames = [f for f in site["cond_indep_stack"] if is_task_frame(f)]
    assert len(frames) == 1 and frames[0].size == 8 and frames[0].dim == -1
    latent = {name for name, s in trace.items()
              if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(eight_schools.GLOBALS) | set(eight_schools.TASK_SITES)
    assert trace["y"]["is_observed"]


def test_exact_evidence_is_bayes_rule(data):
    # log p(y | μ, τ) = log p(y | θ) + log p(θ | μ, τ) − log p(θ | y, μ, τ) for any θ.
    params = {"mu": jnp.array(3.0), "tau": jnp.array(4.5)}
    mean, var = eight_schools.exact_task_posterior(params, data)
    theta = jnp.linspace(-10.0, 20.0, 8)
    rule = (dist.Normal(theta, data["sigma"]).log_prob(data["y"])
            + dist.Normal(params["mu"], params["tau"]).log_prob(theta)
            - dist.Normal(mean, jnp.sqrt(var)).log_prob(theta))
    evidence = eight_schools.exact_log_evidence(params, data)
    assert evidence.shape == (8,)
    np.testing.assert_allclose(evidence, rule, rtol=1e-12)


def test_exact_evidence_plus_prior_is_the_integrated_joint(data):
    # Integrate the model's joint density over θ_j on a grid (trapezoid, per school).
    params = {"mu": jnp.array(5.0), "tau": jnp.array(6.0)}
    grid = jnp.linspace(-120.0, 130.0, 20001)

    def joint(theta):  # theta: (8,) -> log p(y, θ | μ, τ) per school
        _, trace = log_density(eight_schools.model, (), data, {**params, "theta_school": theta})
        return (trace["y"]["fn"].log_prob(data["y"])
                + trace["theta_school"]["fn"].log_prob(theta))

    values = jax.jit(jax.vmap(joint))(jnp.broadcast_to(grid[:, None], (grid.size, 8)))
    integral = jnp.log(jnp.trapezoid(jnp.exp(values), grid, axis=0))
    np.testing.assert_allclose(eight_schools.exact_log_evidence(params, data), integral,
                               atol=1e-8)


def test_type2_ml_hits_the_boundary_tau_zero(data):
    def total(mu, tau):
        return jnp.sum(eight_schools.exact_log_evidence({"mu": mu, "tau": tau}, data))

    # Profile evidence over a τ grid: strictly decreasing, so the maximum is τ = 0.
    taus = jnp.linspace(0.0, 30.0, 301)
    profile = jax.jit(jax.vmap(lambda t: total(eight_schools.profile_mu(t, data), t)))(taus)
    assert int(jnp.argmax(profile)) == 0
    assert bool(jnp.all(jnp.diff(profile) < 0))

    # A gradient optimiser in (μ, log τ) started at τ = 5 runs towards τ = 0.
    minimize = jax.jit(lambda start: jax.scipy.optimize.minimize(
        lambda z: -total(z[0], jnp.exp(z[1])), start, method="BFGS"))
    result = minimize(jnp.array([0.0, jnp.log(5.0)]))
    assert float(jnp.exp(result.x[1])) < 0.5
    assert abs(float(result.x[0]) - 7.6856) < 0.01

    # The reference: τ̂ = 0 exactly, μ̂ the precision-weighted mean.
    fit = eight_schools.exact_type2_ml(data)
    assert float(fit["tau"]) == 0.0
    weights = 1.0 / data["sigma"] ** 2
    np.testing.assert_allclose(fit["mu"], jnp.sum(weights * data["y"]) / jnp.sum(weights),
                               rtol=1e-6)
    np.testing.assert_allclose(float(total(fit["mu"], fit["tau"])), -29.674243688, rtol=1e-8)


def test_laplace_marginal_is_exact(data):
    import numpyro_hbmeta as hbm

    params = {"mu": jnp.array(4.0), "tau": jnp.array(3.0)}
    marginal = hbm.meta_marginal(eight_schools.model, inner=hbm.Newton(), objective="laplace")
    value = jax.jit(lambda p: log_density(marginal, (data,), {}, p)[0])(params)
    prior = dist.Normal(0.0, 5.0).log_prob(4.0) + dist.HalfCauchy(5.0).log_prob(3.0)
    expected = jnp.sum(eight_schools.exact_log_evidence(params, data)) + prior
    np.testing.assert_allclose(value, expected, rtol=1e-10)

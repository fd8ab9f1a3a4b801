"""MetaEB: type-II ML against the closed form, minibatching, reproducibility, posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


@pytest.fixture(scope="module")
def mixed_data():
    with jax.enable_x64(True):
        return linear.simulate(jax.random.PRNGKey(42), num_tasks=60, num_support=8,
                               theta=[1.0, -0.5], tau=0.7, sigma=0.5)


def standard_errors(params, data):
    """Asymptotic s.e. of (θ, log τ, log σ) from the inverse Hessian of −log evidence."""
    def neg(z):
        return -jnp.sum(linear.exact_log_evidence(
            {"theta": z[:2], "tau": jnp.exp(z[2]), "sigma": jnp.exp(z[3])}, data))

    z = jnp.concatenate([params["theta"], jnp.log(jnp.stack([params["tau"],
                                                             params["sigma"]]))])
    return jnp.sqrt(jnp.diag(jnp.linalg.inv(jax.hessian(neg)(z))))


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_type2_ml_equals_closed_form_and_recovers_truth(x64, mixed_data):
    data = mixed_data.support
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.lbfgs())
    result = driver.run(jax.random.PRNGKey(1), 60, data, progress_bar=False)
    exact = linear.exact_type2_ml(data)
    for name in exact:
        np.testing.assert_allclose(result.params[name], exact[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(-result.losses[-1], linear.exact_log_evidence(exact, data).sum(),
                               rtol=1e-10)
    se = standard_errors(exact, data)
    estimate = jnp.concatenate([exact["theta"], jnp.log(jnp.stack([exact["tau"],
                                                                   exact["sigma"]]))])
    truth = jnp.array([1.0, -0.5, np.log(0.7), np.log(0.5)])
    # Within 3 standard errors: fails with probability < 1% per coordinate if unbiased.
    assert bool(jnp.all(jnp.abs(estimate - truth) < 3 * se)), (estimate, truth, se)


def test_adam_reaches_the_same_optimum(x64, linear_data):
    data = linear_data.all_data()
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.adam(0.05))
    result = driver.run(jax.random.PRNGKey(2), 1500, data, progress_bar=False)
    exact = linear.exact_type2_ml(data)
    for name in exact:
        np.testing.assert_allclose(result.params[name], exact[name], rtol=2e-3, atol=2e-3)


def test_same_key_same_numbers_and_init_params(linear_data):
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(3, 0.001), objective="maml")
    runs = [driver.run(jax.random.PRNGKey(3), 20, linear_data.support, linear_data.query,
                       progress_bar=False) for _ in range(2)]
    for name in runs[0].params:
        np.testing.assert_array_equal(runs[0].params[name], runs[1].params[name])
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    assert runs[0].inactive_sites == ("tau",)  # the implicit prior replaces p(φ | θ, τ)
    start = {"theta": jnp.array([1.0, 2.0]), "tau": jnp.array(0.3), "sigma": jnp.array(0.9)}
    state = driver.init(jax.random.PRNGKey(4), linear_data.support, linear_data.query,
                        init_params=start)
    constrained = driver._constrained(state.params, linear_data.support, None)
    for name, value in start.items():
        np.testing.assert_allclose(constrained[name], value, rtol=1e-6)


def test_task_minibatches_scale_the_likelihood(x64, linear_data):
    # With a batch of B of J tasks the loss is J/B times the batch's sum: its expectation over
    # batches is the full loss. Check exactly: the mean over all B-subsets equals the full loss.
    data = linear_data.all_data()
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")
    state = driver.init(jax.random.PRNGKey(5), data)
    full = jax.jit(driver.loss)(state.params, data)
    from itertools import combinations

    @jax.jit
    def batch_loss(params, idx):
        return driver.loss(params, data, task_indices=idx)

    batch_losses = [batch_loss(state.params, jnp.array(s)) for s in combinations(range(6), 2)]
    np.testing.assert_allclose(np.mean(batch_losses), full, rtol=1e-10)
    result = driver.run(jax.random.PRNGKey(6), 5, data, task_batch_size=2, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


def test_task_posterior_is_exact_for_linear_gaussian(x64, linear_data):
    data = linear_data.support
    params = {"theta": jnp.array([0.8, -0.3]), "tau": jnp.array(0.6), "sigma": jnp.array(0.4)}
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")
    posterior = driver.task_posterior(params, data)
    mean, cov = linear.exact_task_posterior(params, data)
    assert posterior.batch_shape == (6,) and posterior.event_shape == (2,)
    np.testing.assert_allclose(posterior.loc, mean, rtol=1e-10)
    np.testing.assert_allclose(posterior.covariance_matrix, cov, rtol=1e-9)
    draws = driver.sample_posterior(jax.random.PRNGKey(7), params, data, 4000)
    assert draws["phi"].shape == (4000, 6, 1, 2) and draws["tau"].shape == (4000,)
    # Monte Carlo: the mean of 4000 draws is within 4 standard errors of the exact mean.
    se = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1) / 4000)
    assert bool(jnp.all(jnp.abs(draws["phi"][:, :, 0].mean(0) - mean) < 4 * se))


def test_task_posterior_under_implicit_prior(x64, linear_data):
    # MAML's posterior: precision = implicit prior precision + support NLL curvature.
    data = linear_data.support
    params = {"theta": jnp.array([0.8, -0.3]), "tau": jnp.array(0.6), "sigma": jnp.array(0.4)}
    inner = hbm.TruncatedGD(5, 0.005)
    posterior = hbm.MetaEB(linear.model, inner=inner, objective="maml").task_posterior(
        params, data)
    prior = hbm.implicit_prior(linear.model, params, data, inner)
    x = data["x"]
    expected = prior.precision_matrix + jnp.einsum("jnf,jng->jfg", x, x) / 0.4**2
    np.testing.assert_allclose(posterior.precision_matrix, expected, rtol=1e-9)


def cauchy_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with hbm.tasks(y.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(mu, 100.0))
        with numpyro.plate("points", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Cauchy(phi, 1.0), obs=y)


def test_non_positive_definite_curvature_is_reported_with_task_index():
    # Task 1's data sit at ±10: at the prior mean φ = 0 the Cauchy log joint has a local
    # maximum, so zero GD steps leave φ̂ where the curvature is negative.
    y = jnp.array([[0.1, -0.1], [10.0, -10.0], [0.2, 0.0]])
    driver = hbm.MetaEB(cauchy_model, inner=hbm.TruncatedGD(0, 0.1, prior="explicit"),
                        objective="laplace")
    with pytest.raises(FloatingPointError, match=r"not positive definite for task\(s\) \[1\]"):
        driver.run(jax.random.PRNGKey(0), 3, {"y": y}, init_params={"mu": jnp.array(0.0)},
                   progress_bar=False)


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_lbfgs_and_hyperprior(x64, linear_data):
    data = linear_data.all_data()
    plain = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                       optimizer=optax.lbfgs())
    with_prior = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                            optimizer=optax.lbfgs(), hyperprior=True)
    state = plain.init(jax.random.PRNGKey(8), data)
    params = {k: jnp.asarray(v) for k, v in state.params.items()}
    # MAP-II adds log p(θ) (constrained density, no Jacobian) to the type-II likelihood.
    constrained = plain._constrained(params, data, None)
    log_prior = (dist.Normal(0, 10).log_prob(constrained["theta"]).sum()
                 + dist.HalfNormal(2.0).log_prob(constrained["tau"])
                 + dist.HalfNormal(2.0).log_prob(constrained["sigma"]))
    np.testing.assert_allclose(with_prior.loss(params, data), plain.loss(params, data)
                               - log_prior, rtol=1e-12)


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_eight_schools_scale_at_boundary_is_reported():
    from numpyro_hbmeta.models import eight_schools

    data = eight_schools.load_data()
    driver = hbm.MetaEB(eight_schools.model, inner=hbm.Newton(), objective="laplace")
    with pytest.warns(UserWarning, match="tau is at its boundary 0.*hyperprior=True"):
        result = driver.run(jax.random.PRNGKey(0), 300, data.support, progress_bar=False)
    assert result.boundary_sites == ("tau",)
    # The closed-form evidence agrees: its maximiser over τ is 0 (Rubin 1981; BDA3 §5.5).
    assert float(eight_schools.exact_type2_ml(data.support)["tau"]) < 1e-2
    linear_data = linear.load_data(small=True).all_data()
    fit = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace").run(
        jax.random.PRNGKey(0), 300, linear_data, progress_bar=False)
    assert fit.boundary_sites == ()

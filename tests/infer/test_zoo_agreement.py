"""The fast approximations next to NUTS on the zoo's real and simulated data (issue 4).

Tolerances, and why:
* radon is linear-Gaussian at the county level, so NUTS over the globals of the Laplace
  marginal targets exactly the same posterior as NUTS on the full model; their difference is
  Monte Carlo error only, about sd·√(1/ESS₁ + 1/ESS₂) ≈ 0.06 sd for ESS ≈ 500 — we allow 0.2 sd.
* County effects from the Laplace-EB task posterior plug in θ̂ instead of averaging over θ's
  posterior; with 85 counties θ is well determined and the shift of a county mean is a small
  fraction of its posterior sd — we allow 0.25 sd on average over counties.
* Hierarchical logistic regression: Laplace EB is approximate twice (Laplace for Bernoulli
  tasks; a point estimate instead of the posterior of θ). We require θ̂ within 0.5 posterior sd
  of NUTS's posterior mean, and task effects within 0.3 sd on average: the posterior of θ
  from 20 tasks is roughly Gaussian, its mode and mean differ by O(1/J) sd.
"""

import jax
import numpy as np
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.infer import baselines
from numpyro_hbmeta.models import logistic, radon


def flat(draws):
    draws = np.asarray(draws)
    return draws.reshape(-1, *draws.shape[2:])


@pytest.fixture(scope="module")
def radon_fits():
    data = radon.load_data(jax.random.PRNGKey(0), query=False).support
    kwargs = dict(num_warmup=500, num_samples=1000, num_chains=1, progress_bar=False)
    full = baselines.run_nuts(radon.model, data, jax.random.PRNGKey(1), **kwargs)
    marginal = baselines.run_nuts_marginal(radon.model, data, jax.random.PRNGKey(2), **kwargs)
    return data, full, marginal


@pytest.mark.slow
def test_radon_nuts_on_laplace_marginal_agrees_with_full_nuts(radon_fits):
    _, full, marginal = radon_fits
    assert full.info["divergences"] == 0
    for site in radon.GLOBALS:
        a, b = flat(full.samples[site]), flat(marginal.samples[site])
        gap = abs(a.mean() - b.mean()) / a.std()
        assert gap < 0.2, (site, a.mean(), b.mean(), a.std())
        np.testing.assert_allclose(b.std(), a.std(), rtol=0.2)
    # Task draws of the marginal fit (Laplace Gaussian per θ draw) match NUTS's county effects.
    a, b = flat(full.samples["alpha"]), flat(marginal.samples["alpha"])
    assert np.mean(np.abs(a.mean(0) - b.mean(0)) / a.std(0)) < 0.2


@pytest.mark.slow
def test_radon_county_effects_from_eb_task_posterior(radon_fits):
    data, full, _ = radon_fits
    driver = hbm.MetaEB(radon.model, inner=hbm.Newton(), objective="laplace")
    fit = driver.run(jax.random.PRNGKey(3), 1500, data, progress_bar=False)
    posterior = driver.task_posterior(fit.params, data)
    eb_means = np.asarray(posterior.to_sites(posterior.mean)["alpha"]).reshape(-1)
    nuts = flat(full.samples["alpha"]).reshape(1000, -1)
    gaps = np.abs(eb_means - nuts.mean(0)) / nuts.std(0)
    assert gaps.mean() < 0.25, gaps.mean()


@pytest.mark.slow
def test_logistic_laplace_eb_against_nuts():
    data = logistic.load_data(jax.random.PRNGKey(0)).all_data()
    nuts = baselines.run_nuts(logistic.model, data, jax.random.PRNGKey(1), num_warmup=500,
                              num_samples=1000, num_chains=1, progress_bar=False)
    driver = hbm.MetaEB(logistic.model, inner=hbm.Newton(), objective="laplace")
    fit = driver.run(jax.random.PRNGKey(2), 1500, data, progress_bar=False)
    theta = flat(nuts.samples["theta"])
    gap = np.abs(np.asarray(fit.params["theta"]) - theta.mean(0)) / theta.std(0)
    assert np.all(gap < 0.5), gap
    posterior = driver.task_posterior(fit.params, data)
    phi_eb = np.asarray(posterior.to_sites(posterior.mean)["phi"]).reshape(-1, theta.shape[-1])
    phi = flat(nuts.samples["phi"]).reshape(theta.shape[0], -1, theta.shape[-1])
    gaps = np.abs(phi_eb - phi.mean(0)) / phi.std(0)
    assert gaps.mean() < 0.3, gaps.mean()

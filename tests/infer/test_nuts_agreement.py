"""Full Bayes two ways: NUTS on the full model and NUTS over θ on the Laplace marginal.

For linear-Gaussian tasks the Laplace marginal with Newton is the exact marginal, so both
samplers target the same posterior of the globals; they must agree within Monte Carlo error.
"""

import jax
import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


def run(model, data, seed):
    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=700, num_chains=1,
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), data)
    return mcmc.get_samples(group_by_chain=True)


@pytest.mark.slow
def test_nuts_on_marginal_agrees_with_nuts_on_full_model(x64):
    data = linear.simulate(jax.random.PRNGKey(11), num_tasks=8, num_support=6).support

    def full(data):
        linear.model(**data)

    full_draws = run(full, data, 0)
    marginal_draws = run(hbm.meta_marginal(linear.model, inner=hbm.Newton()), data, 1)
    for site in ("theta", "tau", "sigma"):
        a, b = np.asarray(full_draws[site]), np.asarray(marginal_draws[site])
        ess_a, ess_b = effective_sample_size(a), effective_sample_size(b)
        a, b = a[0], b[0]
        se = np.sqrt(a.var(0) / ess_a + b.var(0) / ess_b)
        # 4 Monte Carlo standard errors: a false alarm has probability ~1e-4 per coordinate.
        assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4 * se), (site, a.mean(0), b.mean(0), se)
        # Posterior sds agree within 20% (their MC relative error is ~1/sqrt(2 ESS) < 5%).
        np.testing.assert_allclose(a.std(0), b.std(0), rtol=0.2)
    # φ̂ recorded by the marginal is each task's posterior mean given the globals.
    assert marginal_draws["phi"].shape[-3:] == (8, 1, 2)

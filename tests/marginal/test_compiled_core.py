"""The marginal model's inner solve and objective run as one compiled function: an eager call
(NumPyro's MCMC initialisation, Predictive, a user's own) compiles it once instead of
dispatching every small operation of the solve, and equals the call under ``jit``."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


def test_an_eager_call_compiles_the_solve_once_and_equals_the_jitted_call(x64, compiles):
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=5, num_support=6).support
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton(), objective="laplace")
    params = {"theta": jnp.array([0.3, -0.2]), "tau": jnp.asarray(0.8),
              "sigma": jnp.asarray(0.6)}
    marginal.check(data)

    with compiles() as names:
        value, trace = log_density(marginal, (data,), {}, params)
    # Newton's loops would each compile on their own (jit(while)) if run op by op.
    assert names.count("jit(_core)") == 1 and "jit(while)" not in names, names
    with compiles() as names:
        again, _ = log_density(marginal, (data,), {}, params)
    assert "jit(_core)" not in names, names          # cached per task structure
    jitted = jax.jit(lambda p: log_density(marginal, (data,), {}, p)[0])(params)
    np.testing.assert_allclose(value, jitted, rtol=1e-12)
    assert float(again) == float(value)
    # Newton's Laplace evidence of a linear-Gaussian task is exact.
    evidence = trace["hbm_objective"]["fn"].log_factor.reshape(-1)
    np.testing.assert_allclose(evidence, linear.exact_log_evidence(params, data), rtol=1e-10)
    assert trace["phi"]["value"].shape == (5, 1, 2)


def test_a_python_number_argument_stays_static(x64):
    # ``features`` sets a shape: traced as an argument of the compiled solve, it would fail.
    def model(x, y, features=2):
        theta = numpyro.sample("theta", dist.Normal(jnp.zeros(features), 1.0).to_event(1))
        with hbm.tasks(x.shape[0]):
            phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            numpyro.sample("y", dist.Normal(jnp.einsum("jnf,jf->jn", x, phi), 0.5)
                           .to_event(1), obs=y)

    data = linear.simulate(jax.random.PRNGKey(1), num_tasks=4, num_support=5).support
    marginal = hbm.meta_marginal(model, inner=hbm.Newton(), objective="laplace")
    params = {"theta": jnp.array([0.1, 0.2])}
    value, _ = log_density(marginal, ({**data, "features": 2},), {}, params)
    jitted = jax.jit(lambda p: log_density(marginal, ({**data, "features": 2},), {}, p)[0])(
        params)
    np.testing.assert_allclose(value, jitted, rtol=1e-12)
    assert np.isfinite(float(value))

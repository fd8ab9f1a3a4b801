"""baselines.run_eb without task draws: the same globals as the driver, and nothing else."""

import jax
import numpy as np
import optax

import numpyro_hbmeta as hbm
from numpyro_hbmeta import baselines
from numpyro_hbmeta.models import linear


def test_run_eb_globals_only_is_the_driver_fit_from_the_given_start():
    data = linear.load_data(small=True)
    start = {"theta": np.array([0.5, -0.5]), "tau": 0.3, "sigma": 0.8}
    inner = hbm.TruncatedGD(5, 0.002)
    key = jax.random.PRNGKey(0)
    result = baselines.run_eb(linear.model, data.support, key, objective="llama",
                              inner=inner, query=data.query, num_steps=50,
                              optimizer=optax.adam(0.02), eta=0.5, init_params=start,
                              task_draws=False, progress_bar=False)
    driver = hbm.MetaEB(linear.model, inner=inner, objective="llama",
                        optimizer=optax.adam(0.02), eta=0.5)
    fit = driver.run(jax.random.split(key)[0], 50, data.support, data.query,
                     init_params=start, progress_bar=False)
    assert set(result.samples) == set(fit.params) == {"theta", "tau", "sigma"}
    for name, value in fit.params.items():
        np.testing.assert_array_equal(result.samples[name], np.asarray(value)[None, None])
    assert result.task_diagnostics == {}
    assert result.info["final_loss"] == float(fit.losses[-1])

"""The hierarchical logistic-regression zoo model: data, task axis, a short NUTS run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.models import logistic


@pytest.mark.parametrize(("small", "tasks", "points"), [(False, 20, 20), (True, 8, 10)])
def test_load_data_shapes(small, tasks, points):
    data = logistic.load_data(small=small)
    features = len(logistic.TRUE_THETA)
    for part in (data.support, data.query):
        assert part["x"].shape == (tasks, points, features)
        assert part["y"].shape == (tasks, points)
        np.testing.assert_array_equal(part["x"][..., 0], 1.0)
        assert set(np.unique(part["y"]).tolist()) <= {0, 1}
    assert data.task_labels == [f"task{j}" for j in range(tasks)]
    assert data.truth["phi"].shape == (tasks, features)
    assert data.all_data()["y"].shape == (tasks, 2 * points)


def test_load_data_is_reproducible_and_keyed():
    first, again = logistic.load_data(), logistic.load_data(jax.random.PRNGKey(0))
    other = logistic.load_data(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(first.support["y"], again.support["y"])
    assert not np.array_equal(first.support["x"], other.support["x"])


def test_model_has_task_axis_and_declared_sites():
    data = logistic.load_data(small=True).support
    trace = handlers.trace(handlers.seed(logistic.model, 0)).get_trace(**data)
    assert trace["phi"]["value"].shape == (8, 1, 3)
    frames = [f for f in trace["phi"]["cond_indep_stack"] if is_task_frame(f)]
    assert len(frames) == 1 and frames[0].size == 8 and frames[0].dim == -2
    assert trace["y"]["is_observed"] and trace["y"]["fn"].batch_shape == (8, 10)
    latent = {name for name, s in trace.items()
              if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(logistic.GLOBALS) | set(logistic.TASK_SITES)
    assert logistic.LAPLACE_EXACT is False


def test_labels_carry_information_about_the_true_task_weights():
    # The simulated labels must follow the logits: the truth explains them far better than
    # the same task weights with the slopes' signs flipped.
    data = logistic.load_data()
    truth = data.truth
    flipped = truth["phi"] * jnp.array([1.0, -1.0, -1.0])

    def log_lik(phi):
        params = {"theta": truth["theta"], "tau": truth["tau"], "phi": phi[:, None, :]}
        _, trace = log_density(logistic.model, (), data.all_data(), params)
        return float(jnp.sum(trace["y"]["fn"].log_prob(trace["y"]["value"])))

    assert log_lik(truth["phi"]) > log_lik(flipped) + 100.0


@pytest.mark.slow  # a whole-model NUTS smoke run (compiles NUTS: ~15 s of CPU)
def test_nuts_runs_on_the_small_model():
    data = logistic.load_data(small=True)
    mcmc = MCMC(NUTS(logistic.model), num_warmup=200, num_samples=200, num_chains=1,
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), **data.all_data())
    samples = mcmc.get_samples()
    assert samples["theta"].shape == (200, 3)
    assert samples["phi"].shape == (200, 8, 1, 3)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in samples.values())
    assert float(jnp.std(samples["tau"])) > 0.0

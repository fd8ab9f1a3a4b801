"""baselines.run_eb without task draws: the same globals as the driver, and nothing else."""

import jax
import numpy as np
import optax

import numpyro_hbmeta as hbm
from numpyro_hbmeta.infer import baselines
from numpyro_hbmeta.infer.implicit_prior import context_at
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
    # τ is not in LLAMA's objective (the implicit prior replaces p(φ | θ, τ)): not an
    # estimate, so NaN and named, never its start value
    assert fit.inactive_sites == ("tau",) == result.info["inactive_sites"]
    assert np.isnan(result.samples["tau"]).all() and result.samples["tau"].shape == (1, 1)
    for name in ("theta", "sigma"):
        np.testing.assert_array_equal(result.samples[name],
                                      np.asarray(fit.params[name])[None, None])
    assert result.task_diagnostics == {}
    assert result.info["final_loss"] == float(fit.losses[-1])


def test_run_eb_draws_sinusoid_tasks_from_the_declared_structured_posterior():
    # The zoo's --small sinusoid setting with a short fit (after ~50 steps β·λ_max passes 1
    # for some tasks and the implicit prior, so the task posterior, stops existing): draws
    # of all 1761 weights per task from the declared GGN posterior (low rank plus diagonal,
    # no 1761² matrix), centred on the adapted weights φ̂_j.
    from numpyro_hbmeta.models import sinusoid

    settings = sinusoid.ZOO_MODEL.settings(small=True)
    assert settings.posterior_curvature == "ggn"
    data = sinusoid.load_data(small=True)
    inner = hbm.TruncatedGD(settings.maml_steps, settings.maml_step_size)
    start = sinusoid.init_params(jax.random.PRNGKey(1))
    result = baselines.run_eb(sinusoid.model, data.support, jax.random.PRNGKey(0),
                              objective="maml", inner=inner, query=data.query, num_steps=5,
                              optimizer=optax.adam(settings.eb_learning_rate),
                              num_samples=settings.num_samples, init_params=start,
                              posterior_curvature=settings.posterior_curvature,
                              progress_bar=False)
    assert "task_posterior" not in result.info, result.info.get("task_posterior")
    assert result.info["posterior_curvature"] == "ggn"
    phi = result.samples["phi"]
    assert phi.shape == (1, settings.num_samples, 10, 1, sinusoid.NUM_PARAMS)
    assert np.isfinite(phi).all()
    marginal = hbm.meta_marginal(sinusoid.model, inner=inner, objective="maml")
    context = context_at(sinusoid.model, {"theta": result.samples["theta"][0, 0]},
                         data.support)
    phi_hat, _ = jax.jit(lambda: marginal.solve(context, data.support))()
    # 200 draws: the mean of each weight within 5 standard errors of φ̂_j, and the spread
    # of a direction the support data barely move, ≈ the implicit prior's √(Kβ)
    draws = phi[0, :, :, 0]
    sd = draws.std(0)
    error = np.abs(draws.mean(0) - np.asarray(phi_hat))
    np.testing.assert_array_less(error, 5 * sd / np.sqrt(settings.num_samples))
    prior_sd = np.sqrt(settings.maml_steps * settings.maml_step_size)
    assert 0.5 * prior_sd < np.median(sd) <= 1.2 * prior_sd, (np.median(sd), prior_sd)
    assert set(result.task_diagnostics) >= {"inner_grad_norm", "inner_converged"}


def test_run_eb_reports_a_task_posterior_that_does_not_exist():
    # β·λ_max ≈ 1.2–2 at the start (λ_max of the sinusoid's GGN ≈ 110–200 there): K steps
    # of GD imply no Gaussian prior, so no task draws, and the result says why.
    from numpyro_hbmeta.models import sinusoid

    data = sinusoid.load_data(small=True)
    result = baselines.run_eb(sinusoid.model, data.support, jax.random.PRNGKey(0),
                              objective="maml", inner=hbm.TruncatedGD(5, 0.01),
                              query=data.query, num_steps=1, num_samples=10,
                              init_params=sinusoid.init_params(jax.random.PRNGKey(1)),
                              posterior_curvature="ggn", progress_bar=False)
    assert "phi" not in result.samples and result.samples["theta"].shape == (1, 1, 1761)
    assert result.info["task_posterior"].startswith("not formed")
    assert "β·λ ≥ 1" in result.info["task_posterior"]

"""to_inference_data(): one ArviZ layout for every method, netCDF round trip, LOO, masks."""

import warnings

import arviz as az
import jax
import numpy as np
import pytest
from scipy.stats import norm

from numpyro_hbmeta import Newton, TruncatedGD
from numpyro_hbmeta.infer import baselines
from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.models import linear, radon
from numpyro_hbmeta.output.inference_data import task_site_draws, to_inference_data

METHODS = ("nuts", "laplace", "maml", "nuts_marginal", "svi_normal", "svi_delta")


@pytest.fixture(scope="module")
def data():
    return linear.load_data(small=True)


DRAWS = 100
EB_POINT_SITES = tuple(sorted(linear.GLOBALS))  # run_eb: the fitted params, sorted


def _globals_near_truth(rng, point):
    """Draws of the linear model's globals around the truth; repeated if ``point``."""
    theta = np.asarray(linear.TRUE_THETA) + (0 if point else 0.1 * rng.standard_normal(
        (1, DRAWS, 2)))
    tau = linear.TRUE_TAU * (1 if point else np.exp(0.1 * rng.standard_normal((1, DRAWS))))
    sigma = linear.TRUE_SIGMA * (1 if point else np.exp(0.05 * rng.standard_normal((1, DRAWS))))
    return {k: np.broadcast_to(v, shape).astype(np.float32) for k, v, shape in (
        ("theta", theta, (1, DRAWS, 2)), ("tau", tau, (1, DRAWS)),
        ("sigma", sigma, (1, DRAWS)))}


def _task_draws(rng, data):
    """φ draws (1, draws, tasks, 1, features) from the exact task posterior at the truth."""
    params = {"theta": np.asarray(linear.TRUE_THETA), "tau": linear.TRUE_TAU,
              "sigma": linear.TRUE_SIGMA}
    mean, cov = (np.asarray(a, float) for a in linear.exact_task_posterior(params,
                                                                            data.support))
    phi = np.stack([rng.multivariate_normal(m, c, DRAWS) for m, c in zip(mean, cov,
                                                                          strict=True)], 1)
    return phi[None, :, :, None, :].astype(np.float32)


def _nuts_stats(rng):
    """baselines._nuts_stats's layout: (chain, draw) arrays, tree depth from the step count."""
    return {"diverging": np.zeros((1, DRAWS), bool),
            "accept_prob": rng.uniform(0.6, 1.0, (1, DRAWS)).astype(np.float32),
            "energy": rng.normal(40.0, 3.0, (1, DRAWS)).astype(np.float32),
            "tree_depth": np.floor(np.log2(rng.integers(1, 16, (1, DRAWS))) + 1)}


def _eb_diagnostics(tasks, shape=()):
    """Per-task inner-solver diagnostics as run_eb (``shape=()``) or run_nuts_marginal
    (``shape=(chain, draw)``) return them."""
    return {"inner_grad_norm": np.full((*shape, tasks), 1e-6, np.float32),
            "inner_num_steps": np.full((*shape, tasks), 3, np.int32),
            "inner_converged": np.ones((*shape, tasks), bool)}


@pytest.fixture(scope="module")
def fits(data):
    """Hand-made results in each method's layout (the ``FitResult`` that ``baselines.run_*``
    returns: a sampler with its statistics, empirical Bayes with point globals and per-task
    diagnostics, SVI without statistics), with φ drawn from the exact task posterior: the
    exporter is under test here, not the fits. ``test_synthetic_layouts_are_the_fits_layouts``
    holds the EB layouts to real fits; ``tests/cli/test_cli.py`` exports real NUTS, Laplace and
    MAML fits."""
    rng = np.random.default_rng(0)
    tasks = len(data.task_labels)
    eb_info = {"final_loss": 50.0, "num_steps": 100, "inactive_sites": (),
               "boundary_sites": ()}
    point = "point estimate of the globals (empirical Bayes)"
    maml_globals = _globals_near_truth(rng, point=True)
    maml_globals["tau"] = np.full((1, DRAWS), np.nan)
    maml_info = {**eb_info, "inactive_sites": ("tau",), "inner_num_steps": 5,
                 "inner_step_size": 0.002,
                 "inactive_reason": baselines.INACTIVE_REASON.format(objective="maml")}
    support = dict(data.support)
    return {
        "nuts": FitResult("nuts", linear.model, support,
                          {**_globals_near_truth(rng, False), "phi": _task_draws(rng, data)},
                          sample_stats=_nuts_stats(rng), info={"divergences": 0, "chains": 1}),
        "laplace": FitResult("laplace", linear.model, support,
                             {**_globals_near_truth(rng, True), "phi": _task_draws(rng, data)},
                             point_sites=EB_POINT_SITES, task_diagnostics=_eb_diagnostics(tasks),
                             info=eb_info, approximate=point),
        "maml": FitResult("maml", linear.model, support,
                          {**maml_globals, "phi": _task_draws(rng, data)},
                          point_sites=EB_POINT_SITES, task_diagnostics=_eb_diagnostics(tasks),
                          info=maml_info, approximate=point),
        "nuts_marginal": FitResult(
            "nuts_marginal", linear.model, support,
            {**_globals_near_truth(rng, False), "phi": _task_draws(rng, data)},
            task_diagnostics=_eb_diagnostics(tasks, (1, DRAWS)), sample_stats=_nuts_stats(rng),
            info={"divergences": 0, "chains": 1}),
        "svi_normal": FitResult("svi_normal", linear.model, support,
                                {**_globals_near_truth(rng, False), "phi": _task_draws(rng, data)},
                                info={"final_loss": 60.0},
                                approximate="variational (AutoNormal)"),
        "svi_delta": FitResult("svi_delta", linear.model, support,
                               {**_globals_near_truth(rng, True),
                                "phi": np.broadcast_to(_task_draws(rng, data)[:, :1],
                                                       (1, DRAWS, tasks, 1, 2)).copy()},
                               point_sites=(*linear.GLOBALS, "phi"), info={"final_loss": 70.0},
                               approximate="variational (AutoDelta)"),
    }


@pytest.fixture(scope="module")
def eb_fits(data):
    """Real empirical-Bayes fits (Laplace and MAML), for what ``baselines.run_eb`` itself
    reports. Non-partitionable threefry: N-D draws compile ~10x faster on CPU."""
    key = jax.random.PRNGKey(0)
    with jax.threefry_partitionable(False):
        return {
            "laplace": baselines.run_eb(linear.model, data.support, key, objective="laplace",
                                        inner=Newton(), num_steps=100, num_samples=DRAWS,
                                        progress_bar=False),
            "maml": baselines.run_eb(linear.model, data.support, key, objective="maml",
                                     inner=TruncatedGD(5, 0.002), query=data.query,
                                     num_steps=100, num_samples=DRAWS, progress_bar=False),
        }


def _layout(fit):
    """What the exporter reads of a fit: site shapes and dtypes, point sites, statistics and
    diagnostics (shapes, dtypes), the info keys and the approximation note."""
    def shapes(arrays):
        return {k: (np.shape(v), np.asarray(v).dtype.kind) for k, v in arrays.items()}

    return (fit.method, shapes(fit.samples), fit.point_sites, shapes(fit.task_diagnostics),
            shapes(fit.sample_stats), set(fit.info) - {"posterior_curvature"}, fit.approximate)


@pytest.mark.slow  # uses two real run_eb fits (~16 s); the full suite runs it
@pytest.mark.parametrize("method", ["laplace", "maml"])
def test_synthetic_layouts_are_the_fits_layouts(fits, eb_fits, method):
    """The hand-made EB results have exactly the layout of real run_eb results, so the
    exporter tests below see what the fits give."""
    assert _layout(fits[method]) == _layout(eb_fits[method])


@pytest.fixture(scope="module")
def idatas(fits, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # baselines' NUTS stats may lack (chain, draw) shape
        return {name: to_inference_data(fit, task_labels=data.task_labels, query=data.query)
                for name, fit in fits.items()}


@pytest.mark.parametrize("method", METHODS)
def test_task_dim_carries_labels(idatas, fits, data, method):
    phi = idatas[method].posterior["phi"]
    assert phi.dims == ("chain", "draw", "tasks", "phi_dim_0")
    assert list(phi.coords["tasks"].values) == data.task_labels
    np.testing.assert_array_equal(phi.values, fits[method].samples["phi"][:, :, :, 0, :])
    assert idatas[method].log_likelihood["y"].dims == ("chain", "draw", "tasks", "points")
    assert idatas[method].posterior["theta"].dims == ("chain", "draw", "theta_dim_0")


def _closed_form_log_lik(fit, x, y):
    phi = fit.samples["phi"][:, :, :, 0, :].astype(float)
    mean = np.einsum("jnf,cdjf->cdjn", np.asarray(x, float), phi)
    return norm.logpdf(np.asarray(y, float), mean, fit.samples["sigma"][..., None, None])


@pytest.mark.parametrize("method", METHODS)
def test_log_likelihood_is_the_gaussian_density(idatas, fits, data, method):
    expected = _closed_form_log_lik(fits[method], data.support["x"], data.support["y"])
    np.testing.assert_allclose(idatas[method].log_likelihood["y"].values, expected, atol=1e-3)
    held_out = _closed_form_log_lik(fits[method], data.query["x"], data.query["y"])
    np.testing.assert_allclose(idatas[method].predictions["y_log_lik"].values, held_out,
                               atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_netcdf_round_trip(idatas, tmp_path, method):
    idata = idatas[method]
    path = tmp_path / f"{method}.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        original, loaded = idata[group], back[group]
        assert set(loaded.data_vars) == set(original.data_vars)
        for name in original.data_vars:
            np.testing.assert_array_equal(loaded[name].values, original[name].values)
            assert loaded[name].dims == original[name].dims
        if "tasks" in original.coords:
            np.testing.assert_array_equal(loaded["tasks"].values, original["tasks"].values)
    for key in ("method", "point_sites", "approximate", "task_dim"):
        assert back.attrs[key] == idata.attrs[key] == idata.posterior.attrs[key]


@pytest.mark.parametrize("method", METHODS)
def test_loo_runs(idatas, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idatas[method], pointwise=True)
    assert np.isfinite(loo.elpd_loo)
    assert loo.loo_i.size == 8 * 10

@pytest.mark.slow  # uses two real run_eb fits (~16 s); the full suite runs it

def test_point_sites_and_attrs(idatas, eb_fits, data):
    """On a real run_eb Laplace fit: point globals repeated, task draws varying, per-task
    diagnostics along (chain, draw, tasks)."""
    laplace = to_inference_data(eb_fits["laplace"], task_labels=data.task_labels)
    assert laplace.attrs["point_sites"] == ",".join(eb_fits["laplace"].point_sites)
    assert laplace.attrs["approximate"].startswith("point estimate")
    assert laplace.attrs["method"] == "laplace"
    theta = laplace.posterior["theta"].values
    assert np.ptp(theta, axis=(0, 1)).max() == 0.0  # a point estimate, repeated
    assert np.ptp(laplace.posterior["phi"].values, axis=(0, 1)).min() > 0  # task draws vary
    assert idatas["nuts"].attrs["approximate"] == ""
    assert idatas["nuts"].attrs["point_sites"] == ""
    grad_norm = laplace.sample_stats["inner_grad_norm"]
    assert grad_norm.dims == ("chain", "draw", "tasks")
    np.testing.assert_array_equal(grad_norm.values[0, 7],
                                  eb_fits["laplace"].task_diagnostics["inner_grad_norm"])
    assert laplace.sample_stats["inner_converged"].dtype == bool


def test_groups_and_predictive(idatas, data):
    idata = idatas["nuts"]
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data",
            "constant_data", "sample_stats", "predictions",
            "predictions_constant_data"} <= set(idata.groups())
    assert idata.sample_stats["diverging"].dims == ("chain", "draw")
    predictive = idata.posterior_predictive["y"].values
    assert predictive.shape == (1, 100, 8, 10) and np.isfinite(predictive).all()
    observed = np.asarray(data.support["y"])
    np.testing.assert_array_equal(idata.observed_data["y"].values, observed)
    assert not np.allclose(predictive[0, 0], observed)  # drawn, not copied
    # the predictive spread covers the data: most observations within the 90% band
    low, high = np.quantile(predictive[0], [0.05, 0.95], axis=0)
    assert ((observed >= low) & (observed <= high)).mean() > 0.7
    np.testing.assert_array_equal(idata.predictions_constant_data["y"].values,
                                  np.asarray(data.query["y"]))


def test_sample_stats_renamed_and_thinning(radon_idata):
    _, idata = radon_idata
    assert {"diverging", "acceptance_rate", "energy", "tree_depth", "n_steps"} == set(
        idata.sample_stats.data_vars)
    np.testing.assert_array_equal(idata.sample_stats["acceptance_rate"].values, 0.8)
    assert list(idata.posterior.tasks.values) == list(range(12))  # no labels: 0..J-1
    draws = idata.posterior_predictive.draw.values
    assert len(draws) == 10 and draws[0] == 0 and draws[-1] == 39
    assert idata.log_likelihood.sizes["draw"] == 40  # LOO keeps every draw


def test_bad_task_labels(fits):
    with pytest.raises(ValueError, match="expected 8 labels"):
        to_inference_data(fits["nuts"], task_labels=["a", "b"])


def test_task_site_draws(fits):
    draws = task_site_draws(fits["nuts"], "phi")
    assert draws.shape == (1, 100, 8, 2)
    with pytest.raises(ValueError, match="not a task site"):
        task_site_draws(fits["nuts"], "theta")


@pytest.fixture(scope="module")
def radon_idata():
    """Synthetic draws of the radon model (ragged, masked counties); no fit needed."""
    data = radon.load_data(small=True)
    rng = np.random.default_rng(1)
    draws, tasks = 40, len(data.task_labels)
    samples = {"mu_alpha": rng.normal(1.4, 0.1, (1, draws)), "beta": rng.normal(-0.6, 0.1,
                                                                            (1, draws)),
               "tau": rng.uniform(0.2, 0.4, (1, draws)), "sigma": rng.uniform(0.7, 0.9, (1, draws)),
               "alpha": rng.normal(1.4, 0.3, (1, draws, tasks, 1))}
    stats = {"diverging": np.zeros((1, draws), bool), "accept_prob": np.full((1, draws), 0.8),
             "tree_depth": np.full((1, draws), 3.0), "num_steps": np.full((1, draws), 7),
             "energy": np.arange(float(draws))[None], "broken": np.ones(())}
    fit = FitResult("synthetic", radon.model, dict(data.support),
                    {k: v.astype(np.float32) for k, v in samples.items()}, sample_stats=stats)
    with pytest.warns(UserWarning, match="sample_stats\\['broken'\\]"):
        return data, to_inference_data(fit, num_predictive=10)


def test_masked_points_are_dropped(radon_idata, tmp_path):
    data, idata = radon_idata
    mask = np.asarray(data.support["mask"])
    assert not mask.all()  # the data are ragged
    log_lik = idata.log_likelihood["log_radon"]
    assert log_lik.dims == ("chain", "draw", "log_radon_obs")
    assert log_lik.shape[-1] == mask.sum()
    tasks = log_lik.coords["log_radon_tasks"].values
    np.testing.assert_array_equal(np.bincount(tasks, minlength=12), mask.sum(1))
    np.testing.assert_array_equal(log_lik.coords["log_radon_houses"].values, np.nonzero(mask)[1])
    assert idata.posterior_predictive["log_radon"].shape == (1, 10, mask.sum())
    np.testing.assert_array_equal(idata.observed_data["log_radon"].values,
                                  np.asarray(data.support["log_radon"])[mask])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    assert loo.loo_i.size == mask.sum()
    idata.to_netcdf(str(tmp_path / "radon.nc"))
    back = az.from_netcdf(str(tmp_path / "radon.nc"))
    np.testing.assert_array_equal(back.log_likelihood["log_radon_tasks"].values, tasks)


def _doubled_model(x, y_half=None):
    """The linear model observing 2·y_half: no argument is the observed value itself."""
    linear.model(x, None if y_half is None else 2.0 * y_half)


def test_unknown_observed_argument_skips_predictive(fits, data):
    fit = fits["nuts"]._replace(model=_doubled_model, sample_stats={},
                                data={"x": data.support["x"], "y_half": data.support["y"] / 3})
    with pytest.warns(UserWarning, match="observed site\\(s\\) \\['y'\\]"):
        idata = to_inference_data(fit)
    assert "posterior_predictive" not in idata.groups()
    np.testing.assert_allclose(idata.observed_data["y"].values,
                               2 * np.asarray(data.support["y"]) / 3, rtol=1e-6)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "tasks", "points")


def test_inactive_sites_are_named_in_the_attributes(fits, data, tmp_path):
    """A synthetic EB fit whose τ was not estimated (NaN): the posterior says which and why,
    through a netCDF round trip; a fit without such sites has empty attributes."""
    fit = fits["laplace"]
    samples = {**fit.samples, "tau": np.full_like(fit.samples["tau"], np.nan, dtype=float)}
    inactive = fit._replace(method="maml", samples=samples,
                            info={**fit.info, "inactive_sites": ("tau",),
                                  "inactive_reason": "not estimated: not in the objective"})
    idata = to_inference_data(inactive, task_labels=data.task_labels)
    idata.to_netcdf(tmp_path / "maml.nc")
    back = az.from_netcdf(tmp_path / "maml.nc")
    assert back.posterior.attrs["inactive_sites"] == "tau"
    assert back.posterior.attrs["inactive_reason"] == "not estimated: not in the objective"
    assert np.isnan(back.posterior["tau"].values).all()
    assert np.isfinite(back.posterior["theta"].values).all()
    assert to_inference_data(fits["nuts"]).posterior.attrs["inactive_sites"] == ""

@pytest.mark.slow  # uses two real run_eb fits (~16 s); the full suite runs it

def test_run_eb_marks_tau_inactive_under_maml(eb_fits):
    """baselines.run_eb: τ under MAML is NaN in the samples, with the reason in info."""
    maml = eb_fits["maml"]
    assert maml.info["inactive_sites"] == ("tau",)
    assert "does not depend on it" in maml.info["inactive_reason"]
    assert np.isnan(maml.samples["tau"]).all()
    assert np.isfinite(maml.samples["sigma"]).all() and np.isfinite(maml.samples["phi"]).all()

"""The Minnesota radon zoo model: shipped data, ragged tasks with a mask, exact evidence."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro import handlers
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.models import radon

PARAMS = {"mu_alpha": 1.4, "beta": -0.6, "tau": 0.3, "sigma": 0.8}


def test_shipped_table_is_the_minnesota_survey():
    table = radon.load_table(source="package")
    assert table.county.shape == table.floor.shape == table.log_radon.shape == (919,)
    assert len(table.county_names) == 85 and len(set(table.county_names)) == 85
    counts = np.bincount(table.county)
    assert counts.size == 85 and counts.min() == 1 and counts.max() == 116
    assert table.county_names[int(np.argmax(counts))] == "ST LOUIS"
    assert set(table.floor.tolist()) == {0, 1}
    # Gelman & Hill's coding: activity 0 is logged as log(0.1).
    assert np.isclose(table.log_radon.min(), np.log(0.1))
    assert np.all(np.isfinite(table.log_radon))


def test_load_data_pads_every_house_once():
    data = radon.load_data()
    support, query = data.support, data.query
    assert support["floor"].shape == support["log_radon"].shape == support["mask"].shape
    assert support["mask"].shape == (85, 115) and query["mask"].shape == (85, 1)
    assert support["mask"].dtype == jnp.bool_
    assert data.task_labels[0] == "AITKIN" and len(data.task_labels) == 85
    counts = np.bincount(radon.load_table().county)
    np.testing.assert_array_equal(np.asarray(query["mask"][:, 0]), counts >= 3)
    assert int(query["mask"].sum()) == 74
    joined = data.all_data()
    assert joined["mask"].shape == (85, 116)
    np.testing.assert_array_equal(np.asarray(joined["mask"].sum(-1)), counts)
    for part in (support, query):
        assert bool(jnp.all(jnp.isfinite(part["log_radon"])))
        # Real houses first, then padding.
        mask = np.asarray(part["mask"])
        assert np.all(np.diff(mask.astype(int), axis=-1) <= 0)


def test_query_house_is_drawn_with_the_key():
    first, again = radon.load_data(), radon.load_data(jax.random.PRNGKey(0))
    other = radon.load_data(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(first.query["log_radon"], again.query["log_radon"])
    assert not np.array_equal(first.query["log_radon"], other.query["log_radon"])
    none = radon.load_data(query=False)
    assert none.query is None and none.support["mask"].shape == (85, 116)
    assert int(none.support["mask"].sum()) == 919


def test_small_keeps_the_twelve_largest_counties():
    data = radon.load_data(small=True)
    assert len(data.task_labels) == 12 and data.support["floor"].shape[0] == 12
    assert {"ST LOUIS", "HENNEPIN", "DAKOTA", "ANOKA"} <= set(data.task_labels)
    assert int(data.all_data()["mask"].sum()) == 116 + 105 + 63 + 52 + 46 + 32 + 25 + 23 + 4 * 14


@pytest.mark.parametrize("which", ["model", "varying_slopes_model"])
def test_model_has_a_task_axis_of_counties(which):
    model = getattr(radon, which)
    data = radon.load_data(small=True).support
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(**data)
    task_sites = radon.TASK_SITES if which == "model" else radon.VARYING_SLOPES_TASK_SITES
    global_sites = radon.GLOBALS if which == "model" else radon.VARYING_SLOPES_GLOBALS
    for name in task_sites:
        assert trace[name]["value"].shape == (12, 1)
        frames = [f for f in trace[name]["cond_indep_stack"] if is_task_frame(f)]
        assert len(frames) == 1 and frames[0].size == 12 and frames[0].dim == -2
    latent = {name for name, s in trace.items()
              if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(global_sites) | set(task_sites)
    assert trace["log_radon"]["fn"].batch_shape == data["mask"].shape


@jax.jit
def _joint(model_data, alpha):
    params = {**{k: jnp.asarray(v) for k, v in PARAMS.items()}, "alpha": alpha}
    return log_density(radon.model, (), model_data, params)[0]


def test_padded_houses_contribute_exactly_zero(x64):
    data = radon.load_data(query=False).support
    alpha = jnp.linspace(0.5, 2.0, 85)[:, None]
    padded = _joint(data, alpha)
    # The same joint computed house by house from the unpadded table.
    table, p = radon.load_table(), PARAMS
    mean = alpha[table.county, 0] + p["beta"] * table.floor
    expected = (dist.Normal(0.0, 10.0).log_prob(p["mu_alpha"])
                + dist.Normal(0.0, 10.0).log_prob(p["beta"])
                + dist.HalfNormal(1.0).log_prob(p["tau"])
                + dist.HalfNormal(1.0).log_prob(p["sigma"])
                + jnp.sum(dist.Normal(p["mu_alpha"], p["tau"]).log_prob(alpha))
                + jnp.sum(dist.Normal(mean, p["sigma"]).log_prob(table.log_radon)))
    np.testing.assert_allclose(padded, expected, rtol=1e-12)
    # Other (finite) padding values change nothing, not even gradients.
    moved = {**data, "floor": jnp.where(data["mask"], data["floor"], 7.0),
             "log_radon": jnp.where(data["mask"], data["log_radon"], -300.0)}
    assert float(_joint(moved, alpha)) == float(padded)
    grad = jax.jit(jax.grad(_joint, argnums=1))
    np.testing.assert_array_equal(grad(moved, alpha), grad(data, alpha))


def test_exact_evidence_matches_dense_gaussian_per_county(x64):
    data = radon.load_data().support
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    evidence = radon.exact_log_evidence(params, data)
    assert evidence.shape == (85,)
    for j in (0, 1, 41, 69, 84):  # counties of 4, 52, 1, 116 and 2 houses
        mask = np.asarray(data["mask"][j])
        x, y = np.asarray(data["floor"][j])[mask], np.asarray(data["log_radon"][j])[mask]
        cov = PARAMS["sigma"] ** 2 * np.eye(x.size) + PARAMS["tau"] ** 2
        dense = scipy.stats.multivariate_normal(PARAMS["mu_alpha"] + PARAMS["beta"] * x,
                                                cov).logpdf(y)
        np.testing.assert_allclose(evidence[j], dense, rtol=1e-12)


def test_exact_evidence_is_bayes_rule_per_county(x64):
    data = radon.load_data().support
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    mean, var = radon.exact_task_posterior(params, data)
    alpha = jnp.full((85,), 1.1)
    lik = jnp.sum(jnp.where(data["mask"], dist.Normal(
        alpha[:, None] + PARAMS["beta"] * data["floor"], PARAMS["sigma"]).log_prob(
        data["log_radon"]), 0.0), -1)
    rule = (lik + dist.Normal(PARAMS["mu_alpha"], PARAMS["tau"]).log_prob(alpha)
            - dist.Normal(mean, jnp.sqrt(var)).log_prob(alpha))
    np.testing.assert_allclose(radon.exact_log_evidence(params, data), rule, rtol=1e-10)


def test_type2_ml_matches_gelman_and_hill():
    # lmer(y ~ x + (1 | county)), Gelman & Hill (2006) §12.4: 1.46, -0.69, 0.33, 0.76.
    fit = radon.exact_type2_ml(radon.load_data(query=False).support)
    np.testing.assert_allclose(
        [fit["mu_alpha"], fit["beta"], fit["tau"], fit["sigma"]],
        [1.46, -0.69, 0.33, 0.76], atol=0.01)


def test_laplace_marginal_is_exact(x64):
    import numpyro_hbmeta as hbm

    data = radon.load_data(small=True).all_data()
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    marginal = hbm.meta_marginal(radon.model, inner=hbm.Newton(), objective="laplace")
    value = jax.jit(lambda q: log_density(marginal, (data,), {}, q)[0])(params)
    prior = (dist.Normal(0.0, 10.0).log_prob(PARAMS["mu_alpha"])
             + dist.Normal(0.0, 10.0).log_prob(PARAMS["beta"])
             + dist.HalfNormal(1.0).log_prob(PARAMS["tau"])
             + dist.HalfNormal(1.0).log_prob(PARAMS["sigma"]))
    expected = jnp.sum(radon.exact_log_evidence(params, data)) + prior
    np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_reads_a_cached_arviz_example(tmp_path, monkeypatch):
    xarray = pytest.importorskip("xarray")
    table = radon.load_table(source="package")
    path = tmp_path / radon.ARVIZ_FILE
    obs = {"obs_id": np.arange(919)}
    xarray.Dataset({"y": ("obs_id", table.log_radon)}, coords=obs).to_netcdf(
        path, group="observed_data", mode="w")
    xarray.Dataset(
        {"floor_idx": ("obs_id", table.floor), "county_idx": ("obs_id", table.county),
         "uranium": ("County", np.zeros(85))},
        coords={**obs, "County": table.county_names},
    ).to_netcdf(path, group="constant_data", mode="a")
    monkeypatch.setenv("ARVIZ_DATA", str(tmp_path))
    cached = radon.load_table(source="arviz")
    np.testing.assert_array_equal(cached.county, table.county)
    np.testing.assert_array_equal(cached.floor, table.floor)
    np.testing.assert_allclose(cached.log_radon, table.log_radon)
    assert cached.county_names == table.county_names
    # With the packaged copy gone, "auto" falls back on the cache.
    monkeypatch.setattr(radon, "DATA_FILE", "data/missing.csv")
    assert radon.load_data(small=True, source="auto").task_labels[-1] == "WASHINGTON"


def test_missing_data_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("ARVIZ_DATA", str(tmp_path))
    monkeypatch.setattr(radon, "DATA_FILE", "data/missing.csv")
    with pytest.raises(FileNotFoundError) as info:
        radon.load_data()
    message = str(info.value)
    assert "missing.csv" in message and str(tmp_path / radon.ARVIZ_FILE) in message
    with pytest.raises(FileNotFoundError):
        radon.load_table(source="arviz")
    with pytest.raises(ValueError, match="source"):
        radon.load_table(source="web")


@pytest.mark.slow  # a whole-model NUTS smoke run (compiles NUTS: ~15 s of CPU)
def test_nuts_runs_on_the_small_model():
    data = radon.load_data(small=True)
    mcmc = MCMC(NUTS(radon.model), num_warmup=200, num_samples=200, num_chains=1,
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), **data.all_data())
    samples = mcmc.get_samples()
    assert samples["alpha"].shape == (200, 12, 1)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in samples.values())
    # First-floor readings are lower (Gelman & Hill: β ≈ −0.7).
    assert float(jnp.mean(samples["beta"])) < -0.3

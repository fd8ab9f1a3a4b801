"""compare(): exact identities on synthetic draws of the linear model's sites (no fits)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.models import linear
from numpyro_hbmeta.output.compare import COLUMNS, compare, summary_table

CHAINS, DRAWS = 2, 1000
SHIFT = 0.5  # reference sds


@pytest.fixture(scope="module")
def data():
    return linear.load_data(small=True)


def _draws(rng, loc, scale, shape):
    return (loc + scale * rng.standard_normal((CHAINS, DRAWS, *shape))).astype(np.float32)


@pytest.fixture(scope="module")
def reference(data):
    rng = np.random.default_rng(0)
    phi = np.asarray(data.truth["phi"])[:, None, :]  # (tasks, 1, features)
    samples = {"theta": _draws(rng, np.array([1.0, -0.5]), 0.2, (2,)),
               "tau": np.abs(_draws(rng, 0.7, 0.1, ())),
               "sigma": np.abs(_draws(rng, 0.5, 0.05, ())),
               "phi": _draws(rng, phi, 0.15, phi.shape)}
    stats = {"diverging": np.zeros((CHAINS, DRAWS), bool)}
    return FitResult("nuts", linear.model, dict(data.support), samples, sample_stats=stats,
                     wall_time=2.0)


def _shifted(reference):
    samples = {k: v + SHIFT * v.std((0, 1)) for k, v in reference.samples.items()}
    return reference._replace(method="shifted", samples=samples, sample_stats={},
                              approximate="shifted by half a reference sd")


def _point(reference):
    samples = {k: np.broadcast_to(v.mean((0, 1)), v.shape).copy()
               for k, v in reference.samples.items()}
    return reference._replace(method="point", samples=samples, sample_stats={},
                              point_sites=tuple(samples), approximate="point estimate")


@pytest.fixture(scope="module")
def table(reference):
    return compare([reference, _shifted(reference), _point(reference)])


def _row(table, method, site):
    rows = table[(table.method == method) & (table.site == site)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_columns_rows_and_kinds(table):
    assert tuple(table.columns) == COLUMNS
    assert len(table) == 3 * 4
    assert set(table[table.kind == "task"].site) == {"phi"}
    assert set(table[table.kind == "global"].site) == {"theta", "tau", "sigma"}
    assert table.heldout_lpd.isna().all()  # no query


@pytest.mark.parametrize("site", ["theta", "tau", "sigma", "phi"])
def test_reference_against_itself(table, site):
    row = _row(table, "nuts", site)
    assert row.mean_diff_sd == 0.0
    assert row.sd_ratio == pytest.approx(1.0, abs=1e-12)
    assert row.w2 == 0.0
    # the reference's own central intervals hold the nominal share of its draws, up to ~1/S
    assert row.coverage_90 == pytest.approx(0.9, abs=0.01)
    assert row.coverage_50 == pytest.approx(0.5, abs=0.01)
    assert row.ess_per_s > 0 and np.isfinite(row.ess_per_s)
    assert row.wall_time == 2.0


@pytest.mark.parametrize("site", ["theta", "tau", "sigma", "phi"])
def test_shifted_by_half_an_sd(table, reference, site):
    row = _row(table, "shifted", site)
    assert row.mean_diff_sd == pytest.approx(SHIFT, rel=1e-4)
    assert row.sd_ratio == pytest.approx(1.0, rel=1e-5)
    sd = reference.samples[site].astype(float).std((0, 1)).ravel()
    assert row.w2 == pytest.approx(np.mean(SHIFT * sd), rel=1e-4)
    # P(|Z + 1/2| <= 1.645) for Gaussian draws
    expected = norm.cdf(1.645 - SHIFT) - norm.cdf(-1.645 - SHIFT)
    assert row.coverage_90 == pytest.approx(expected, abs=0.02)
    assert math.isnan(row.ess_per_s)  # not a sampler
    assert row.approximate == "shifted by half a reference sd"


def test_point_estimate_rows(table, reference):
    row = _row(table, "point", "theta")
    assert row.mean_diff_sd == pytest.approx(0.0, abs=1e-5)
    assert math.isnan(row.sd_ratio)
    assert row.coverage_90 == 0.0 and row.coverage_50 == 0.0
    sd = reference.samples["theta"].astype(float).std((0, 1))
    assert row.w2 == pytest.approx(sd.mean(), rel=1e-4)  # sqrt(0² + s_r²)
    assert math.isnan(row.ess_per_s)


def _closed_form_lpd(result, query):
    x, y = np.asarray(query["x"], float), np.asarray(query["y"], float)
    phi = result.samples["phi"].reshape(-1, *result.samples["phi"].shape[2:])[:, :, 0]
    sigma = result.samples["sigma"].reshape(-1)
    mean = np.einsum("jnf,sjf->sjn", x, phi)
    log_lik = norm.logpdf(y, mean, sigma[:, None, None])
    return float(np.mean(logsumexp(log_lik, axis=0) - np.log(log_lik.shape[0])))


def test_heldout_lpd_matches_closed_form(data, reference):
    shifted = _shifted(reference)
    small = {"nuts": reference, "shifted": shifted}
    thin = {k: r._replace(samples={s: v[:, :200] for s, v in r.samples.items()})
            for k, r in small.items()}
    table = compare(thin, query=data.query)
    for name, result in thin.items():
        lpd = table[table.method == name].heldout_lpd
        assert lpd.nunique() == 1  # one number per method
        assert lpd.iloc[0] == pytest.approx(_closed_form_lpd(result, data.query), abs=1e-3)
    # draws around the truth predict held-out points better than shifted ones
    assert (table[table.method == "nuts"].heldout_lpd.iloc[0]
            > table[table.method == "shifted"].heldout_lpd.iloc[0])


def test_summary_table(table):
    summary = summary_table(table)
    assert list(summary.index) == ["nuts", "shifted", "point"]
    assert summary.loc["shifted", ("phi", "mean_diff_sd")] == pytest.approx(SHIFT, abs=1e-3)
    assert summary.loc["nuts", ("method", "wall_time")] == 2.0
    assert ("theta", "coverage_90") in summary.columns


def test_errors(reference):
    with pytest.raises(ValueError, match="reference 'nuts' is not among"):
        compare({"a": reference}, reference="nuts")
    with pytest.raises(ValueError, match="more than once"):
        compare([reference, reference])
    bad = reference._replace(samples={**reference.samples,
                                      "theta": reference.samples["theta"][..., :1]})
    with pytest.raises(ValueError, match="site 'theta'"):
        compare({"nuts": reference, "bad": bad})


def test_inactive_site_is_not_scored(reference):
    """A global the method's objective does not depend on (τ under MAML) is NaN in the fit,
    never "k sd off": its metrics are NaN with a note saying why."""
    from numpyro_hbmeta.output.compare import METRICS, not_estimated_lines

    samples = {k: v.copy() for k, v in reference.samples.items()}
    samples["tau"] = np.full_like(samples["tau"], np.nan)
    maml = reference._replace(method="maml", samples=samples, sample_stats={},
                              point_sites=("theta", "tau", "sigma"),
                              info={"inactive_sites": ("tau",),
                                    "inactive_reason": "not estimated: not in the objective"})
    table = compare([reference, maml])
    tau = _row(table, "maml", "tau")
    assert all(math.isnan(tau[m]) for m in METRICS)
    assert tau.note == "not estimated: not in the objective"
    assert pd.isna(_row(table, "maml", "theta").note)
    assert not math.isnan(_row(table, "maml", "theta").mean_diff_sd)
    assert not_estimated_lines(table) == ["maml: tau not estimated: not in the objective"]
    assert math.isnan(summary_table(table).loc["maml", ("tau", "mean_diff_sd")])

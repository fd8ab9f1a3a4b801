"""plots: every figure renders to a non-trivial PNG and draws what it says (no fits needed)."""

import os

import matplotlib.image
import numpy as np
import numpyro.distributions as dist
import pytest
from matplotlib.figure import Figure

from numpyro_hbmeta import TruncatedGD
from numpyro_hbmeta.infer.implicit_prior import implicit_prior_variances
from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.models import linear
from numpyro_hbmeta.output import plots

MIN_BYTES = 15_000


@pytest.fixture(scope="module")
def data():
    return linear.load_data(small=True)


@pytest.fixture(scope="module")
def params(data):
    return {"theta": np.asarray(linear.TRUE_THETA, np.float32),
            "tau": np.float32(linear.TRUE_TAU), "sigma": np.float32(linear.TRUE_SIGMA)}


def _fit(name, data, mean, cov, *, seed):
    """A FitResult whose φ draws are the given per-task Gaussians, globals near the truth."""
    rng = np.random.default_rng(seed)
    phi = np.stack([rng.multivariate_normal(m, c, 400) for m, c in zip(mean, cov, strict=True)],
                   axis=1)  # (draws, tasks, features)
    samples = {"phi": phi[None, :, :, None, :].astype(np.float32),
               "theta": rng.normal(linear.TRUE_THETA, 0.2, (1, 400, 2)).astype(np.float32),
               "tau": np.full((1, 400), linear.TRUE_TAU, np.float32),
               "sigma": np.full((1, 400), linear.TRUE_SIGMA, np.float32)}
    return FitResult(name, linear.model, dict(data.support), samples)


@pytest.fixture(scope="module")
def results(data, params):
    mean, cov = (np.asarray(a, float) for a in linear.exact_task_posterior(params, data.support))
    return {"nuts": _fit("nuts", data, mean, cov, seed=0),
            "laplace": _fit("laplace", data, mean + 0.1, cov, seed=1),
            "maml": _fit("maml", data, mean - 0.1, 0.5 * cov, seed=2)}


def _no_pooling(data):
    x, y = np.asarray(data.support["x"], float), np.asarray(data.support["y"], float)
    return np.stack([np.linalg.lstsq(xj, yj, rcond=None)[0] for xj, yj in zip(x, y, strict=True)])


def _pooled(data):
    x, y = np.asarray(data.support["x"], float), np.asarray(data.support["y"], float)
    return np.linalg.lstsq(x.reshape(-1, 2), y.ravel(), rcond=None)[0]


def _check_png(figure, path):
    """Saved, big enough, and not one flat colour. ``HBMETA_PLOT_DIR`` keeps a copy to look at."""
    assert isinstance(figure, Figure)
    plots.save(figure, path)
    keep = os.environ.get("HBMETA_PLOT_DIR")
    if keep:
        plots.save(figure, os.path.join(keep, path.name))
    assert path.stat().st_size > MIN_BYTES
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and min(image.shape[:2]) > 300
    assert image[..., :3].var() > 0.01
    assert (image[..., :3].mean(-1) < 0.5).mean() > 0.005  # dark ink: lines, text, markers


def test_forest(results, data, tmp_path):
    figure = plots.forest(results, "phi", task_labels=data.task_labels)
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["task0[0]", "task0[1]"] and len(labels) == 16
    assert ax.get_legend().get_texts()[0].get_text() == "nuts (reference)"
    _check_png(figure, tmp_path / "forest.png")
    one = plots.forest(results, "phi", component=1)
    assert len(one.axes[0].get_yticklabels()) == 8


def test_shrinkage_arrows_point_to_posterior_means(results, data, tmp_path):
    no_pooling, pooled = _no_pooling(data), _pooled(data)
    figure = plots.shrinkage(results["nuts"], no_pooling, pooled)
    ax = figure.axes[0]
    arrows = [child for child in ax.texts if child.arrow_patch is not None]
    assert len(arrows) == 8
    partial = results["nuts"].samples["phi"].mean((0, 1))[:, 0]
    np.testing.assert_allclose(sorted(a.xy for a in arrows), sorted(map(tuple, partial)),
                               rtol=1e-5)
    _check_png(figure, tmp_path / "shrinkage_plane.png")
    line = plots.shrinkage(results["nuts"], no_pooling, pooled, component=1,
                           task_labels=data.task_labels)
    _check_png(line, tmp_path / "shrinkage_slope.png")
    with pytest.raises(ValueError, match="no_pooling: expected shape"):
        plots.shrinkage(results["nuts"], no_pooling[:3], pooled)


def _implicit_prior(data, params, inner):
    """The implicit prior of every task as a MultivariateNormal, from the closed-form Hessian
    XᵀX/σ² of the linear model's support loss (``implicit_prior`` itself is tested in
    test_implicit_prior.py and costs seconds of compilation)."""
    x = np.asarray(data.support["x"], float)
    values, vectors = np.linalg.eigh(np.einsum("jnf,jng->jfg", x, x) / params["sigma"] ** 2)
    q = np.asarray(implicit_prior_variances(values, num_steps=inner.num_steps,
                                            step_size=inner.step_size))
    cov = np.einsum("jik,jk,jlk->jil", vectors, q, vectors)
    return dist.MultivariateNormal(np.broadcast_to(params["theta"], (len(x), 2)), cov)


def test_implicit_prior_ellipse(data, params, tmp_path):
    prior = _implicit_prior(data, params, TruncatedGD(5, linear.FIT["maml_step_size"]))
    # the task posterior under that prior: Gaussian, precision P0 + XᵀX/σ²
    x, y = (np.asarray(data.support[k], float)[2] for k in ("x", "y"))
    prior_precision = np.linalg.inv(np.asarray(prior.covariance_matrix, float)[2])
    cov = np.linalg.inv(prior_precision + x.T @ x / params["sigma"] ** 2)
    mean = cov @ (prior_precision @ params["theta"] + x.T @ y / params["sigma"] ** 2)
    figure = plots.implicit_prior_ellipse(prior, (mean, cov), task=2)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 6  # two Gaussians x (1 sd, 2 sd, centre)
    np.testing.assert_allclose(lines[2].get_xydata()[0], params["theta"], rtol=1e-5)
    np.testing.assert_allclose(lines[5].get_xydata()[0], mean, rtol=1e-5)
    # the 1-sd ellipse of the prior: every point at Mahalanobis distance 1 from the centre
    points = lines[0].get_xydata() - params["theta"]
    precision = np.linalg.inv(np.asarray(prior.covariance_matrix, float)[2])
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", points, precision, points), 1.0,
                               rtol=1e-4)
    _check_png(figure, tmp_path / "implicit_prior.png")


def test_loss_curves_and_axes_argument(tmp_path):
    steps = np.arange(300)
    losses = {"maml": 900 * np.exp(-steps / 40) + 5, "laplace": 600 * np.exp(-steps / 20) + 3}
    figure = plots.loss_curves(losses)
    assert figure.axes[0].get_yscale() == "log"  # positive, > two decades
    _check_png(figure, tmp_path / "loss_curves.png")
    shared = Figure()
    ax = shared.add_subplot()
    assert plots.loss_curves({"x": -steps}, ax=ax) is shared
    assert ax.get_yscale() == "linear"


def test_predictive_bands(results, data, tmp_path):
    rng = np.random.default_rng(3)
    x = np.asarray(data.support["x"])[0, :, 1]
    phi = results["nuts"].samples["phi"][0, :, 0, 0]  # task 0: (draws, features)
    draws = phi[:, :1] + phi[:, 1:] * x + linear.TRUE_SIGMA * rng.standard_normal((400, x.size))
    figure = plots.predictive_bands(x, draws, np.asarray(data.support["y"])[0], title="task0")
    collections = figure.axes[0].collections
    assert len(collections) == 2  # 90% and 50% bands
    _check_png(figure, tmp_path / "predictive_bands.png")


def test_save_writes_png(tmp_path):
    figure = plots.loss_curves({"a": np.linspace(1.0, 2.0, 10)})
    path = plots.save(figure, tmp_path / "nested" / "loss.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(path)).ndim == 3

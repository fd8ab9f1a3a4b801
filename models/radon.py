"""Minnesota radon (Gelman & Hill 2006): real, ragged tasks handled with a mask.

Log radon y_i of house i in county j[i], measured in the basement (x_i = 0) or on the first
floor (x_i = 1); a task is a county. Varying intercepts, common slope (Gelman & Hill 2006,
§12.3–12.4, ``lmer(y ~ x + (1 | county))``):

    α_j ~ N(μ_α, τ²),  y_i ~ N(α_j[i] + β x_i, σ²),

with μ_α, β ~ N(0, 10²) and τ, σ ~ HalfNormal(1). :func:`varying_slopes_model` also lets the
floor effect vary by county (§13.1). Both are linear-Gaussian at the task level, so the county
evidence is closed-form (:func:`exact_log_evidence`, a compound-symmetric Gaussian) and the
Laplace evidence with a converged inner solver is exact (``LAPLACE_EXACT = True``).

What it teaches: meta-learning on real, unbalanced tasks. Counties hold 1 to 116 houses, so
the data are padded to the largest county with finite dummy values and a boolean ``mask``;
padded points go through :func:`numpyro.handlers.mask` and contribute exactly zero to every log
density (and gradient). Pooling is strongest for the many counties with a handful of houses,
and a plain gradient step on the support log-likelihood sees curvature n_j / σ² from 1/σ² to
116/σ²: one MAML step size cannot suit every task, while Newton/Laplace adapt per task.
``hbmeta compare`` takes β = 0.5 / max_j λ_max,j at the start of the fit, so the largest county
sets it; MAML then learns σ partly as an inner learning rate (the step on the residuals is
β/σ²), and at the fitted σ β·λ can exceed 1 for the largest counties: the report says so and
MAML's task posterior is not formed there (``numpyro_hbmeta.infer.baselines.run_eb``).

Data (no network at run time): the 919 houses of 85 counties ship with the package in
``models/data/radon_mn.csv`` (origin, commit and license in ``models/data/README.md``: ArviZ's
example-data repository, Apache-2.0, the source of its ``radon`` example). A cached copy of
ArviZ's ``radon_hierarchical.nc`` in ArviZ's data home (``$ARVIZ_DATA`` or ``~/arviz_data``)
is used when the packaged file is missing or when asked for (``source="arviz"``); this module
never calls ``arviz.load_arviz_data``, which would download it.

Layout: ``floor``, ``log_radon``, ``mask`` of shape (counties, houses), houses padded to the
largest county. Query set (default ``query=True``): one house drawn at random (``rng_key``)
from each county with at least 3 houses (74 of the 85, each keeping ≥ 2 support houses; the 11
counties with 1 or 2 houses are all support), as (counties, 1) arrays whose ``mask`` is False
where no house is held out; ``query=False`` puts every house in the support set.
``small=True`` keeps the 12 largest counties.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.zoo import FitSettings, ZooModel

SUMMARY = "Minnesota radon (Gelman & Hill 2006), 85 counties; ragged tasks, mask; exact evidence"
GLOBALS = ("mu_alpha", "beta", "tau", "sigma")
TASK_SITES = ("alpha",)
LAPLACE_EXACT = True

VARYING_SLOPES_GLOBALS = ("mu_alpha", "mu_beta", "tau_alpha", "tau_beta", "sigma")
VARYING_SLOPES_TASK_SITES = ("alpha", "beta")

DATA_FILE = "data/radon_mn.csv"
ARVIZ_FILE = "radon_hierarchical.nc"
NUM_SMALL = 12
MIN_HOUSES_FOR_QUERY = 3


def _houses(mean, sigma, floor, log_radon, mask) -> None:
    # Padded houses are masked out: their log density is replaced by an exact 0.
    with numpyro.plate("houses", floor.shape[1], dim=-1), \
            numpyro.handlers.mask(mask=True if mask is None else mask):
        numpyro.sample("log_radon", dist.Normal(mean, sigma), obs=log_radon)


def model(floor, log_radon=None, mask=None):
    """floor: (counties, houses) 0/1; log_radon: (counties, houses); mask: (counties, houses)
    bool, True for real houses (``None``: all real)."""
    mu_alpha = numpyro.sample("mu_alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with tasks(floor.shape[0], dim=-2):
        alpha = numpyro.sample("alpha", dist.Normal(mu_alpha, tau))  # (counties, 1)
        _houses(alpha + beta * floor, sigma, floor, log_radon, mask)


def varying_slopes_model(floor, log_radon=None, mask=None):
    """As :func:`model`, with a floor effect β_j ~ N(μ_β, τ_β²) per county; shapes alike."""
    mu_alpha = numpyro.sample("mu_alpha", dist.Normal(0.0, 10.0))
    mu_beta = numpyro.sample("mu_beta", dist.Normal(0.0, 10.0))
    tau_alpha = numpyro.sample("tau_alpha", dist.HalfNormal(1.0))
    tau_beta = numpyro.sample("tau_beta", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with tasks(floor.shape[0], dim=-2):
        alpha = numpyro.sample("alpha", dist.Normal(mu_alpha, tau_alpha))
        beta = numpyro.sample("beta", dist.Normal(mu_beta, tau_beta))
        _houses(alpha + beta * floor, sigma, floor, log_radon, mask)


class RadonTable(NamedTuple):
    """One row per house: ``county`` index into ``county_names``, ``floor``, ``log_radon``."""

    county: np.ndarray
    floor: np.ndarray
    log_radon: np.ndarray
    county_names: list[str]


def arviz_data_home() -> Path:
    """ArviZ's data home (``$ARVIZ_DATA`` or ``~/arviz_data``), without creating it as
    ``arviz.data.datasets.get_data_home`` would."""
    return Path(os.path.expanduser(os.environ.get("ARVIZ_DATA", os.path.join("~", "arviz_data"))))


def _package_file():
    return importlib.resources.files(__package__).joinpath(DATA_FILE)


def _read_package_csv() -> RadonTable:
    text = _package_file().read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    names = list(dict.fromkeys(row["county"] for row in rows))
    index = {name: j for j, name in enumerate(names)}
    return RadonTable(
        county=np.array([index[row["county"]] for row in rows], dtype=np.int32),
        floor=np.array([int(row["floor"]) for row in rows], dtype=np.int32),
        log_radon=np.array([float(row["log_radon"]) for row in rows]),
        county_names=names,
    )


def _read_arviz_netcdf(path: Path) -> RadonTable:
    """ArviZ's ``radon`` InferenceData: ``observed_data.y``, ``constant_data.floor_idx`` and
    ``county_idx`` (0-based), county names in the ``County`` coordinate."""
    import xarray

    with xarray.open_dataset(path, group="observed_data") as observed, \
            xarray.open_dataset(path, group="constant_data") as constant:
        log_radon = np.asarray(observed["y"].values, dtype=float)
        floor = np.asarray(constant["floor_idx"].values, dtype=np.int32)
        county = np.asarray(constant["county_idx"].values, dtype=np.int32)
        if "County" in constant.coords:
            names = [str(n) for n in constant.coords["County"].values]
        else:
            names = [f"county{j}" for j in range(int(county.max()) + 1)]
    return RadonTable(county, floor, log_radon, names)


def load_table(*, source: str = "auto") -> RadonTable:
    """The 919 Minnesota houses, from the packaged CSV or a cached ArviZ ``radon`` example.

    Args:
        source: ``"package"`` (``models/data/radon_mn.csv``), ``"arviz"`` (``radon_hierarchical.nc``
            in :func:`arviz_data_home`) or ``"auto"`` (the package, else ArviZ's cache).

    Raises:
        FileNotFoundError: neither copy is available; the message names both places.
    """
    if source not in ("auto", "package", "arviz"):
        raise ValueError(f"source must be 'auto', 'package' or 'arviz', got {source!r}")
    package_file, arviz_file = _package_file(), arviz_data_home() / ARVIZ_FILE
    if source in ("auto", "package") and package_file.is_file():
        return _read_package_csv()
    if source in ("auto", "arviz") and arviz_file.is_file():
        return _read_arviz_netcdf(arviz_file)
    raise FileNotFoundError(
        f"the Minnesota radon data were not found (source={source!r}). Looked for the copy "
        f"shipped with numpyro_hbmeta at {package_file} and for ArviZ's cached example at "
        f"{arviz_file} (set ARVIZ_DATA to move it). Reinstall numpyro_hbmeta with its package "
        "data, or cache ArviZ's example once with arviz.load_arviz_data('radon') on a machine "
        "with network access."
    )


def _largest(counts: np.ndarray, num: int) -> np.ndarray:
    """Indices of the ``num`` largest counties, in their original order (ties: first wins)."""
    order = np.argsort(-counts, kind="stable")[:num]
    return np.sort(order)


def _pad(groups: list[np.ndarray], table: RadonTable, width: int) -> dict[str, jnp.ndarray]:
    """Task-major (counties, width) arrays of the houses ``groups[j]``, padded with floor 0,
    log radon 0 (finite, so no NaN reaches a gradient through a masked branch) and mask False."""
    floor = np.zeros((len(groups), width))
    log_radon = np.zeros((len(groups), width))
    mask = np.zeros((len(groups), width), bool)
    for j, houses in enumerate(groups):
        floor[j, :houses.size] = table.floor[houses]
        log_radon[j, :houses.size] = table.log_radon[houses]
        mask[j, :houses.size] = True
    return {"floor": jnp.asarray(floor), "log_radon": jnp.asarray(log_radon),
            "mask": jnp.asarray(mask)}


def load_data(rng_key=None, *, small: bool = False, query: bool = True,
              source: str = "auto") -> TaskData:
    """Counties as tasks, padded and masked; see the module docstring for the layout.

    Args:
        rng_key: picks the held-out house of each county (default ``PRNGKey(0)``).
        small: keep the ``NUM_SMALL`` (12) largest counties.
        query: hold out one house per county with ≥ 3 houses; ``False``: no query set.
        source: where to read the data, see :func:`load_table`.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    table = load_table(source=source)
    counts = np.bincount(table.county, minlength=len(table.county_names))
    keep = _largest(counts, NUM_SMALL) if small else np.arange(counts.size)
    groups = [np.flatnonzero(table.county == j) for j in keep]
    names = [table.county_names[j] for j in keep]
    if not query:
        support = _pad(groups, table, max(g.size for g in groups))
        return TaskData(support=support, query=None, task_labels=names, truth=None)
    draws = np.asarray(jax.random.uniform(rng_key, (len(groups),)))
    support_groups, query_groups = [], []
    for houses, u in zip(groups, draws, strict=True):
        if houses.size < MIN_HOUSES_FOR_QUERY:
            support_groups.append(houses)
            query_groups.append(houses[:0])
            continue
        held_out = min(int(u * houses.size), houses.size - 1)
        support_groups.append(np.delete(houses, held_out))
        query_groups.append(houses[held_out:held_out + 1])
    support = _pad(support_groups, table, max(g.size for g in support_groups))
    return TaskData(support=support, query=_pad(query_groups, table, 1), task_labels=names,
                    truth=None)


def exact_log_evidence(params, data) -> jnp.ndarray:
    """log p(y_j | μ_α, β, τ, σ) per county, shape (counties,), masked houses excluded.

    y_j ~ N(μ_α + β x_j, σ² I + τ² 11ᵀ) over the n_j real houses; with residuals r = y_j −
    μ_α − β x_j, the determinant lemma and Sherman–Morrison give

        −½ [n_j log 2π + (n_j − 1) log σ² + log(σ² + n_j τ²)
            + Σr²/σ² − τ² (Σr)² / (σ² (σ² + n_j τ²))].
    """
    mask = data.get("mask")
    mask = jnp.ones(data["floor"].shape, bool) if mask is None else mask
    residual = jnp.where(mask, data["log_radon"] - params["mu_alpha"]
                         - params["beta"] * data["floor"], 0.0)
    n = jnp.sum(mask, axis=-1)
    sigma2, tau2 = params["sigma"] ** 2, params["tau"] ** 2
    total = sigma2 + n * tau2
    quadratic = (jnp.sum(residual**2, -1) / sigma2
                 - tau2 * jnp.sum(residual, -1) ** 2 / (sigma2 * total))
    return -0.5 * (n * jnp.log(2 * jnp.pi) + (n - 1) * jnp.log(sigma2) + jnp.log(total)
                   + quadratic)


def exact_task_posterior(params, data):
    """Mean and variance of α_j | y_j, μ_α, β, τ, σ, each (counties,)."""
    mask = data.get("mask")
    mask = jnp.ones(data["floor"].shape, bool) if mask is None else mask
    residual = jnp.where(mask, data["log_radon"] - params["beta"] * data["floor"], 0.0)
    precision = jnp.sum(mask, -1) / params["sigma"] ** 2 + 1.0 / params["tau"] ** 2
    mean = (jnp.sum(residual, -1) / params["sigma"] ** 2
            + params["mu_alpha"] / params["tau"] ** 2) / precision
    return mean, 1.0 / precision


def exact_type2_ml(data, *, init=None) -> dict:
    """Maximise Σ_j :func:`exact_log_evidence` over (μ_α, β, log τ, log σ) with SciPy's BFGS on
    float64 gradients, independently of the library's handler: the reference for empirical
    Bayes (the maximum-likelihood fit of ``lmer(y ~ x + (1 | county), REML = FALSE)``)."""
    from numpyro_hbmeta.models._reference import minimise_float64

    start = np.array([1.0, 0.0, np.log(0.5), np.log(0.5)]) if init is None else np.asarray(
        init, float)

    def unpack(z):
        return {"mu_alpha": z[0], "beta": z[1], "tau": jnp.exp(z[2]), "sigma": jnp.exp(z[3])}

    with jax.enable_x64(True):
        data64 = {k: jnp.asarray(v, bool if k == "mask" else jnp.float64)
                  for k, v in data.items()}
        z = minimise_float64(lambda z: -jnp.sum(exact_log_evidence(unpack(z), data64)), start,
                             gtol=1e-8, jac_tol=1e-4)
    return {k: jnp.asarray(v) for k, v in unpack(jnp.asarray(z)).items()}


ZOO_MODEL = ZooModel(
    name="radon", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    default_methods=("maml", "laplace", "nuts"),
    fit=FitSettings(maml_step_size=None),
    exact_type2_ml=exact_type2_ml,
)

"""Compare methods site by site against a reference fit (NUTS on the full model, by default).

Every method returns a :class:`~numpyro_hbmeta.infer.results.FitResult` with draws of every site
(point estimates repeated), so one table measures how far each method's posterior is from the
reference's, per site: the globals θ, τ, σ and the task parameters φ_j, the latter averaged
over tasks. This is the check the design asks for: the fast meta-learning approximations
against full Bayes on the very same model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
from jax.scipy.special import logsumexp

from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.marginal.meta_marginal import model_structure
from numpyro_hbmeta.output.inference_data import pointwise_log_likelihood

__all__ = ["COLUMNS", "METRICS", "compare", "heldout_lpd", "named_results",
           "not_estimated", "not_estimated_lines", "site_metrics", "summary_table"]

COLUMNS = ("method", "site", "kind", "mean_diff_sd", "sd_ratio", "w2", "coverage_50",
           "coverage_90", "heldout_lpd", "wall_time", "ess_per_s", "approximate", "note")

#: The distribution columns of :func:`site_metrics`, NaN for a site a method did not estimate.
METRICS = ("mean_diff_sd", "sd_ratio", "w2", "coverage_50", "coverage_90", "ess_per_s")


def not_estimated(result: FitResult) -> dict[str, str]:
    """Sites a fit holds without estimating them -> why: the globals its objective does not
    depend on (``info["inactive_sites"]``, e.g. τ under MAML), stored as NaN."""
    reason = result.info.get("inactive_reason", "not estimated by this method")
    return {site: reason for site in result.info.get("inactive_sites", ())}


def named_results(results: Mapping[str, FitResult] | Sequence[FitResult]
                  ) -> dict[str, FitResult]:
    """Name -> fit; a list is named by each ``result.method``, which must then be unique."""
    if isinstance(results, Mapping):
        return dict(results)
    names = [r.method for r in results]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"results name the method(s) {repeated} more than once; pass a dict "
                         "name -> FitResult to tell them apart")
    return dict(zip(names, results, strict=True))


def _flat_draws(result: FitResult, site: str) -> np.ndarray:
    """(chain·draw, coordinates) draws of one site."""
    value = np.asarray(result.samples[site], float)
    return value.reshape(value.shape[0] * value.shape[1], -1)


def _coverage(method: np.ndarray, reference: np.ndarray, level: float) -> float:
    low, high = np.quantile(method, [(1 - level) / 2, (1 + level) / 2], axis=0)
    inside = (reference >= low) & (reference <= high)
    return float(inside.mean())


def _ess_per_s(result: FitResult, site: str) -> float:
    if not result.sample_stats or site in result.point_sites or not result.wall_time > 0:
        return math.nan
    value = np.asarray(result.samples[site], float)
    value = value.reshape(*value.shape[:2], -1)
    ess = az.ess(az.convert_to_dataset(value), method="bulk")
    return float(np.mean(ess.to_array().values)) / result.wall_time


def site_metrics(method: FitResult, reference: FitResult, site: str) -> dict[str, float]:
    """The distribution columns of :func:`compare` for one site (see there for the math)."""
    draws, ref = _flat_draws(method, site), _flat_draws(reference, site)
    if draws.shape[1] != ref.shape[1]:
        raise ValueError(f"site {site!r}: {method.method} has draws of shape "
                         f"{method.samples[site].shape[2:]}, the reference "
                         f"{reference.samples[site].shape[2:]}")
    mean, sd = draws.mean(0), draws.std(0)
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_diff = np.abs(mean - ref_mean) / ref_sd
        sd_ratio = sd / ref_sd
    point = site in method.point_sites
    return {
        "mean_diff_sd": float(mean_diff.mean()),
        "sd_ratio": math.nan if point else float(sd_ratio.mean()),
        "w2": float(np.sqrt((mean - ref_mean) ** 2 + (sd - ref_sd) ** 2).mean()),
        "coverage_50": _coverage(draws, ref, 0.5),
        "coverage_90": _coverage(draws, ref, 0.9),
        "ess_per_s": _ess_per_s(method, site),
    }


def heldout_lpd(result: FitResult, query: Mapping[str, Any]) -> float:
    """Mean over held-out points (every observed site, every task, padded points excluded) of
    log (1/S) Σ_s p(y_query_ji | draw s), with the method's own S draws."""
    log_lik = pointwise_log_likelihood(result, query)
    lpd = []
    for values in log_lik.values():
        flat = np.asarray(values.values, float).reshape(result.num_chains * result.num_draws, -1)
        lpd.append(np.asarray(logsumexp(flat, axis=0)) - math.log(flat.shape[0]))
    return float(np.concatenate(lpd).mean())


def compare(results: Mapping[str, FitResult] | Sequence[FitResult], reference: str = "nuts",
            *, query: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (method, site): how each method's posterior differs from the reference's.

    Per site, every scalar coordinate c (e.g. ``theta[0]``, ``phi[task 3, 1]``) is compared
    on its marginal, with m, s the method's draw mean and sd, m_r, s_r the reference's
    (sd with ddof 0), and the per-coordinate numbers are averaged over the site's coordinates.
    For a task site that is the mean over tasks of the per-task average (every task has the
    same coordinates), i.e. "summarised over tasks". Sites present in the reference and the
    method are compared, in the reference's order; others are skipped.

    Columns:
        * ``method``, ``site``; ``kind``: ``"task"`` for latent sites in the tasks plate,
          ``"global"`` otherwise (from the reference model's structure).
        * ``mean_diff_sd``: |m − m_r| / s_r, the error of the mean in reference sds.
        * ``sd_ratio``: s / s_r (1 is right, < 1 overconfident); NaN for point-estimated
          sites (``result.point_sites``), whose sd is 0 by construction.
        * ``w2``: the 2-Wasserstein distance between the moment-matched Gaussians,
          W2(N(m, s²), N(m_r, s_r²)) = sqrt((m − m_r)² + (s − s_r)²), in the site's units.
        * ``coverage_50``, ``coverage_90``: the fraction of reference draws x_r inside the
          method's central interval [q_(1−p)/2, q_(1+p)/2] of its own draws (inclusive),
          p = 0.5, 0.9. A calibrated method gives ≈ p; the reference against itself gives p
          within ~2/S. A point estimate's interval is the single value, so its coverage is 0
          (unless the reference's draws hit that value exactly, i.e. are degenerate).
        * ``heldout_lpd``: with ``query`` (held-out data of the same tasks, the model's keyword
          arguments), the mean over held-out points i of log (1/S) Σ_s p(y_query_i | draw s)
          with the method's own draws (higher is better); one number per method, repeated
          on its rows; NaN without ``query``. Padded (masked) points are excluded.
        * ``wall_time``: seconds of the fit (``result.wall_time``), per method.
        * ``ess_per_s``: mean over coordinates of ArviZ's bulk ESS (``az.ess``) of the
          method's draws, divided by ``wall_time``; only for samplers (results with
          ``sample_stats``, i.e. MCMC); NaN for point-estimated sites and for methods whose
          draws are independent by construction (SVI, empirical Bayes).
        * ``approximate``: ``result.approximate`` (why the method is approximate; ``None``
          when it is exact in its own terms).
        * ``note``: why a site has no metrics (:func:`not_estimated`: a global the method's
          objective does not depend on is not an estimate, so it is not scored: its metric
          columns are NaN), else ``None``.

    Args:
        results: name -> fit, or a list of fits named by ``result.method``.
        reference: the name of the reference fit (it gets rows too: itself vs itself).
        query: held-out data for ``heldout_lpd``.

    Returns:
        A DataFrame with exactly the columns :data:`COLUMNS`.

    Raises:
        ValueError: the reference is missing, names repeat, or a site's shapes differ.
    """
    named = named_results(results)
    if reference not in named:
        raise ValueError(f"reference {reference!r} is not among the results {list(named)}")
    ref = named[reference]
    spec = model_structure(ref.model, ref.data)
    task_sites = {s.name for s in spec.task_sites}
    rows = []
    for name, result in named.items():
        lpd = math.nan if query is None else heldout_lpd(result, query)
        skipped = not_estimated(result)
        for site in (s for s in ref.samples if s in result.samples):
            metrics = ({k: math.nan for k in METRICS} if site in skipped
                       else site_metrics(result, ref, site))
            rows.append({"method": name, "site": site,
                         "kind": "task" if site in task_sites else "global",
                         **metrics, "heldout_lpd": lpd,
                         "wall_time": float(result.wall_time),
                         "approximate": result.approximate, "note": skipped.get(site)})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summary_table(df: pd.DataFrame, metrics: Sequence[str] = ("mean_diff_sd", "sd_ratio",
                                                              "coverage_90"),
                  *, digits: int = 3) -> pd.DataFrame:
    """A compact method × site view of :func:`compare`'s table, for printing.

    Rows are methods (in the table's order); columns are (site, metric) for ``metrics``,
    then the per-method ``("method", "wall_time")`` and ``("method", "heldout_lpd")``;
    values rounded to ``digits``. Sites a method did not estimate (``note``) show NaN:
    :func:`not_estimated_lines` says why.

    Examples:
        >>> print(summary_table(compare(fits, query=data.query)))  # doctest: +SKIP
    """
    methods = list(dict.fromkeys(df["method"]))
    sites = list(dict.fromkeys(df["site"]))
    wide = df.pivot(index="method", columns="site", values=list(metrics))
    wide = wide.swaplevel(axis=1).reindex(
        columns=pd.MultiIndex.from_product([sites, list(metrics)]))
    per_method = df.groupby("method", sort=False)[["wall_time", "heldout_lpd"]].first()
    per_method.columns = pd.MultiIndex.from_product([["method"], per_method.columns])
    return pd.concat([wide, per_method], axis=1).reindex(methods).round(digits)


def not_estimated_lines(df: pd.DataFrame) -> list[str]:
    """One line per (method, site) of :func:`compare`'s table that has a ``note``: the sites
    shown as NaN because the method did not estimate them."""
    noted = df[df["note"].notna()]
    return [f"{row.method}: {row.site} {row.note}" for row in noted.itertuples()]

"""Figures for comparing methods on one hierarchical model (matplotlib, no display needed).

Every function takes an optional ``ax`` (draw into an existing Axes) and returns the Figure.
Without ``ax`` the Figure is built directly (``matplotlib.figure.Figure``, not ``pyplot``), so
nothing depends on an interactive backend and no global figure list grows; Jupyter still shows
a returned Figure inline. :func:`save` writes a PNG.

* :func:`forest`: task effects across methods, reference highlighted.
* :func:`shrinkage`: partial pooling, arrows from the no-pooling estimates.
* :func:`implicit_prior_ellipse`: MAML's implicit prior (Grant et al., ICLR 2018, §3.2)
  against a task posterior, as covariance ellipses.
* :func:`loss_curves`: optimisation traces.
* :func:`predictive_bands`: posterior predictive median and 50%/90% bands for one task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.marginal.meta_marginal import model_structure
from numpyro_hbmeta.output.compare import named_results
from numpyro_hbmeta.output.inference_data import task_site_draws

__all__ = ["forest", "implicit_prior_ellipse", "loss_curves", "predictive_bands", "save",
           "shrinkage"]

REFERENCE_COLOR = "black"
PRIOR_COLOR, POSTERIOR_COLOR = "tab:orange", "tab:blue"


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def _palette(names: Sequence[str], reference: str | None) -> dict[str, str]:
    colors = iter(f"C{i}" for i in range(100))
    return {n: REFERENCE_COLOR if n == reference else next(colors) for n in names}


def _row_labels(task_labels: Sequence, components: Sequence[int], many: bool) -> list[str]:
    return [f"{label}[{k}]" if many else str(label) for label in task_labels
            for k in components]


def forest(results: Mapping[str, FitResult] | Sequence[FitResult], site: str,
           task_labels: Sequence | None = None, *, reference: str | None = "nuts",
           component: int | None = None, ax: Axes | None = None) -> Figure:
    """Per-task posterior of ``site`` for every method: mean (dot), central 50% (thick) and
    90% (thin) intervals, methods offset vertically within each task's row.

    The reference method is drawn in black on top of a grey band spanning its 90% interval,
    so each method reads as "inside or outside the reference".

    Args:
        results: name -> fit, or fits named by ``result.method``.
        site: a task site (e.g. ``"phi"``).
        task_labels: row labels (default 0..J-1).
        reference: the name of the reference fit (``None``: no highlight).
        component: for a site with several values per task (``phi`` of a regression), the
            one to show; default all, one row per (task, component).
        ax: Axes to draw into.
    """
    named = named_results(results)
    draws = {name: task_site_draws(r, site) for name, r in named.items()}
    draws = {n: d.reshape(-1, *d.shape[2:]) for n, d in draws.items()}  # (S, tasks, comps)
    num_tasks, num_components = next(iter(draws.values())).shape[1:]
    components = range(num_components) if component is None else [component]
    labels = range(num_tasks) if task_labels is None else task_labels
    rows = _row_labels(labels, components, num_components > 1 and component is None)
    figure, ax = _axes(ax, (6.5, 1.0 + 0.32 * len(rows) * max(1, len(named) / 3)))
    colors = _palette(list(named), reference)
    offsets = np.linspace(-0.3, 0.3, len(named)) if len(named) > 1 else np.zeros(1)
    position = np.arange(len(rows))
    for offset, (name, value) in zip(offsets, draws.items(), strict=True):
        value = value[:, :, list(components)].reshape(value.shape[0], -1)
        q05, q25, q75, q95 = np.quantile(value, [0.05, 0.25, 0.75, 0.95], axis=0)
        is_reference = name == reference
        if is_reference:
            ax.barh(position, q95 - q05, left=q05, height=0.8, color="0.88", zorder=0)
        y = position + offset
        ax.hlines(y, q05, q95, color=colors[name], linewidth=1.0, zorder=2)
        ax.hlines(y, q25, q75, color=colors[name], linewidth=3.5 if is_reference else 2.5,
                  zorder=2)
        ax.plot(value.mean(0), y, "o", color=colors[name], markersize=5 if is_reference else 4,
                zorder=3, label=f"{name} (reference)" if is_reference else name)
    ax.set_yticks(position, rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(site if component is None else f"{site}[{component}]")
    ax.set_title(f"{site}: mean, 50% and 90% intervals per task")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return figure


def _task_means(result: FitResult, site: str | None) -> tuple[str, np.ndarray]:
    if site is None:
        site = model_structure(result.model, result.data).task_sites[0].name
    return site, task_site_draws(result, site).mean((0, 1))  # (tasks, components)


def shrinkage(result: FitResult, no_pooling: Any, pooled: Any, *, site: str | None = None,
              component: int | None = None, task_labels: Sequence | None = None,
              ax: Axes | None = None) -> Figure:
    """Partial pooling at a glance: an arrow per task from its no-pooling estimate (fitted on
    that task's data alone, e.g. the per-task least-squares fit of a regression) to the
    partially pooled posterior mean of ``result``, with the complete-pooling estimate.

    With one value per task (or ``component`` chosen) the tasks are spread along the x axis
    and the pooled estimate is a horizontal line; with two values per task (intercept and
    slope) and ``component=None`` the plot is the plane of the two, the pooled estimate a star
    with dashed cross-hairs.

    Args:
        result: the hierarchical fit.
        no_pooling: (tasks,) or (tasks, components) per-task estimates.
        pooled: scalar or (components,) complete-pooling estimate.
        site: the task site (default the model's first).
        component: which value per task to show (1-D view).
        task_labels: labels of the tasks (1-D view ticks).
        ax: Axes to draw into.
    """
    site, partial = _task_means(result, site)
    no_pooling = np.asarray(no_pooling, float)
    no_pooling = no_pooling[:, None] if no_pooling.ndim == 1 else no_pooling
    pooled = np.atleast_1d(np.asarray(pooled, float))
    if no_pooling.shape != partial.shape:
        raise ValueError(f"no_pooling: expected shape {partial.shape} (tasks, components) "
                         f"like {site!r}, got {no_pooling.shape}")
    if component is None and partial.shape[1] == 2:
        return _shrinkage_plane(site, no_pooling, partial, pooled, ax)
    k = 0 if component is None else component
    pooled_k = pooled[k] if pooled.size > 1 else pooled[0]
    return _shrinkage_line(f"{site}[{k}]", no_pooling[:, k], partial[:, k], pooled_k,
                           task_labels, ax)


def _arrows(ax: Axes, start: np.ndarray, end: np.ndarray) -> None:
    # drawn over the markers and ending at their centres, so even short arrows show a head
    for (x0, y0), (x1, y1) in zip(start, end, strict=True):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=4,
                    arrowprops={"arrowstyle": "-|>", "color": "0.15", "linewidth": 1.0,
                                "shrinkA": 0, "shrinkB": 0, "mutation_scale": 9})


def _shrinkage_line(name: str, no_pooling: np.ndarray, partial: np.ndarray, pooled: float,
                    task_labels: Sequence | None, ax: Axes | None) -> Figure:
    figure, ax = _axes(ax, (6.5, 4.0))
    x = np.arange(no_pooling.shape[0])
    _arrows(ax, np.column_stack([x, no_pooling]), np.column_stack([x, partial]))
    ax.plot(x, no_pooling, "o", mfc="white", color="C1", label="no pooling")
    ax.plot(x, partial, "o", color="C0", label="partial pooling (posterior mean)")
    ax.axhline(pooled, color="0.2", linestyle="--", linewidth=1.0, label="complete pooling")
    if task_labels is not None:
        ax.set_xticks(x, [str(t) for t in task_labels], rotation=45, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel(name)
    ax.set_title(f"shrinkage of {name}")
    ax.legend(fontsize="small")
    return figure


def _shrinkage_plane(site: str, no_pooling: np.ndarray, partial: np.ndarray,
                     pooled: np.ndarray, ax: Axes | None) -> Figure:
    figure, ax = _axes(ax, (5.5, 5.0))
    _arrows(ax, no_pooling, partial)
    ax.plot(*no_pooling.T, "o", mfc="white", color="C1", label="no pooling")
    ax.plot(*partial.T, "o", color="C0", label="partial pooling (posterior mean)")
    ax.plot(*pooled[:2], "*", color="0.1", markersize=14, label="complete pooling")
    ax.axvline(pooled[0], color="0.2", linestyle="--", linewidth=0.8)
    ax.axhline(pooled[1], color="0.2", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"{site}[0]")
    ax.set_ylabel(f"{site}[1]")
    ax.set_title(f"shrinkage of {site}")
    ax.legend(fontsize="small")
    return figure


def _gaussian(gaussian: Any, task: int, dims: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of one task of a batched MultivariateNormal or a (mean, cov)."""
    if isinstance(gaussian, tuple):
        mean, cov = (np.asarray(g, float) for g in gaussian)
    else:
        mean = np.asarray(gaussian.loc, float)
        cov = np.asarray(gaussian.covariance_matrix, float)
    mean = np.broadcast_to(mean, cov.shape[:-1])
    if mean.ndim == 2:
        mean, cov = mean[task], cov[task]
    dims = list(dims)
    return mean[dims], cov[np.ix_(dims, dims)]


def _ellipse(mean: np.ndarray, cov: np.ndarray, radius: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    angle = np.linspace(0.0, 2 * np.pi, 200)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    return mean[:, None] + radius * vectors @ (np.sqrt(np.maximum(values, 0))[:, None] * circle)


def implicit_prior_ellipse(prior_mvn: Any, posterior_mvn: Any, task: int = 0, *,
                           dims: Sequence[int] = (0, 1), levels: Sequence[float] = (1.0, 2.0),
                           labels: Sequence[str] = ("implicit prior", "task posterior"),
                           ax: Axes | None = None) -> Figure:
    """Covariance ellipses (Mahalanobis radius 1 and 2 by default) of the implicit prior that
    truncated gradient descent imposes (:func:`numpyro_hbmeta.infer.implicit_prior`, Grant et al.
    2018, eq. 5-6) and of the task's posterior (e.g. ``MetaEB.task_posterior``, or a NUTS
    moment match given as ``(mean, cov)``), over two of the task's unconstrained parameters.

    Args:
        prior_mvn: ``MultivariateNormal`` with batch shape (tasks,), or ``(mean, cov)``.
        posterior_mvn: the same for the posterior.
        task: which task.
        dims: the two coordinates of the flat task parameters to show.
        levels: radii of the ellipses, in standard deviations.
        labels: legend names of the two Gaussians.
        ax: Axes to draw into.
    """
    figure, ax = _axes(ax, (5.5, 5.0))
    styles = ["-", "--", ":", "-."]
    for gaussian, color, label in zip((prior_mvn, posterior_mvn), (PRIOR_COLOR, POSTERIOR_COLOR),
                                      labels, strict=True):
        mean, cov = _gaussian(gaussian, task, dims)
        for i, level in enumerate(levels):
            points = _ellipse(mean, cov, level)
            ax.plot(*points, styles[i % 4], color=color,
                    label=f"{label}, {level:g} sd" if i < 2 else None)
        ax.plot(*mean, "+", color=color, markersize=12, markeredgewidth=2)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(f"task parameter {dims[0]}")
    ax.set_ylabel(f"task parameter {dims[1]}")
    ax.set_title(f"implicit prior vs posterior, task {task}")
    ax.legend(fontsize="small")
    return figure


def loss_curves(losses: Mapping[str, Any], *, log_scale: bool | None = None,
                ax: Axes | None = None) -> Figure:
    """One optimisation trace per name (e.g. ``MetaEBResult.losses``) against the step.

    ``log_scale=None`` uses a log y axis when every loss is positive and they span more than
    two decades.
    """
    figure, ax = _axes(ax, (6.5, 4.0))
    arrays = {name: np.asarray(value, float).ravel() for name, value in losses.items()}
    for name, value in arrays.items():
        ax.plot(np.arange(value.size), value, label=name, linewidth=1.2)
    finite = np.concatenate([v[np.isfinite(v)] for v in arrays.values()] or [np.ones(1)])
    if log_scale is None:
        log_scale = bool(finite.size and finite.min() > 0 and finite.max() > 100 * finite.min())
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves")
    ax.legend(fontsize="small")
    return figure


def predictive_bands(x: Any, draws: Any, y_obs: Any = None, *, x_obs: Any = None,
                     label: str = "posterior predictive", title: str | None = None,
                     ax: Axes | None = None) -> Figure:
    """Posterior predictive median and central 50%/90% bands of one task over ``x``.

    Args:
        x: (points,) inputs where ``draws`` were made (sorted here).
        draws: (draws, points) predictive draws (e.g. ``idata.posterior_predictive.y`` of
            one task, chains stacked).
        y_obs: observed values to overlay, at ``x_obs`` (default ``x``).
        x_obs: inputs of ``y_obs``.
        label: legend name of the median.
        title: Axes title (e.g. the task's label).
        ax: Axes to draw into.
    """
    x = np.asarray(x, float).ravel()
    draws = np.asarray(draws, float).reshape(-1, x.size)
    order = np.argsort(x)
    q05, q25, q50, q75, q95 = np.quantile(draws[:, order], [0.05, 0.25, 0.5, 0.75, 0.95], 0)
    figure, ax = _axes(ax, (6.5, 4.0))
    ax.fill_between(x[order], q05, q95, color="C0", alpha=0.2, linewidth=0, label="90%")
    ax.fill_between(x[order], q25, q75, color="C0", alpha=0.4, linewidth=0, label="50%")
    ax.plot(x[order], q50, color="C0", linewidth=1.5, label=f"{label} median")
    if y_obs is not None:
        x_obs = x if x_obs is None else np.asarray(x_obs, float).ravel()
        ax.plot(x_obs, np.asarray(y_obs, float).ravel(), "o", color="black", markersize=4,
                label="observed")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    if title is not None:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return figure


def save(figure: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write ``figure`` as a PNG at ``dpi`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    return path

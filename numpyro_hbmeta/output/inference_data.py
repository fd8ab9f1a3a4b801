"""ArviZ export: one :class:`arviz.InferenceData` convention for every method's :class:`FitResult`.

Whatever produced the fit (NUTS, NUTS on the Laplace marginal, SVI, MAML/LLAMA/Laplace
empirical Bayes), :func:`to_inference_data` lays it out the same way, so ArviZ summaries, LOO
and plots compare methods like for like:

* every task site, observed site and task-indexed diagnostic carries a dimension named after
  the tasks plate (``"tasks"`` by default) whose coordinate is the user's task labels
  (else 0..J-1), always the first dimension after (chain, draw);
* size-1 axes that a site only has because a plate it is not in broadcasts against it are
  dropped: ``phi`` of shape (chain, draw, tasks, 1, 2) becomes (chain, draw, tasks,
  phi_dim_0); axes of plates a site is in are named after the plate (``points``);
* ragged tasks (a :func:`numpyro.handlers.mask` on an observed site, e.g. the radon model's
  ``mask``) are stored without their padded points, see :func:`to_inference_data`.

The helpers :func:`task_site_draws` and :func:`pointwise_log_likelihood` give the same views
to :mod:`numpyro_hbmeta.output.compare` and :mod:`numpyro_hbmeta.output.plots`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import arviz as az
import jax
import numpy as np
import numpyro
import xarray as xr
from numpyro import handlers
from numpyro.infer import Predictive, log_likelihood

from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.marginal.meta_marginal import model_structure
from numpyro_hbmeta.marginal.rerun import site_mask

__all__ = ["STAT_NAMES", "pointwise_log_likelihood", "task_site_draws", "to_inference_data"]

#: NumPyro NUTS statistic -> ArviZ ``sample_stats`` name.
STAT_NAMES = {"diverging": "diverging", "tree_depth": "tree_depth", "energy": "energy",
              "accept_prob": "acceptance_rate", "num_steps": "n_steps",
              "step_size": "step_size", "potential_energy": "lp"}


class SiteLayout(NamedTuple):
    """How one site's value (without its leading draw axes) maps onto named dimensions.

    Attributes:
        dims: names of the kept axes, task axis first where the site has one.
        order: the kept axes, in the order of ``dims``.
        squeeze: size-1 batch axes that no plate of the site stands for (dropped).
        batch_ndim: how many of ``dims`` are batch (not event) dimensions.
    """

    dims: tuple[str, ...]
    order: tuple[int, ...]
    squeeze: tuple[int, ...]
    batch_ndim: int

    def apply(self, value: Any, lead: int) -> np.ndarray:
        """(``lead`` draw axes, *site shape) -> (``lead`` draw axes, *dims)."""
        value = np.asarray(value)
        axes = [*range(lead), *(lead + a for a in self.order), *(lead + a for a in self.squeeze)]
        kept = [value.shape[lead + a] for a in self.order]
        return np.transpose(value, axes).reshape(*value.shape[:lead], *kept)


def _layout(name: str, shape: Sequence[int], batch_ndim: int, plates: Mapping[int, str],
            task_dim: str) -> SiteLayout:
    """``plates`` maps the (negative) batch dim of each plate the site is in to its name."""
    named, squeeze = {}, []
    for axis, extent in enumerate(shape[:batch_ndim]):
        plate = plates.get(axis - batch_ndim)
        if plate is not None:
            named[axis] = plate
        elif extent == 1:
            squeeze.append(axis)
    task_axes = [a for a, plate in named.items() if plate == task_dim]
    batch = [a for a in range(batch_ndim) if a not in squeeze and a not in task_axes]
    order = [*task_axes, *batch, *range(batch_ndim, len(shape))]
    dims, unnamed = [], 0
    for axis in order:
        if axis in named:
            dims.append(named[axis])
        else:
            dims.append(f"{name}_dim_{unnamed}")
            unnamed += 1
    return SiteLayout(tuple(dims), tuple(order), tuple(squeeze), batch_ndim - len(squeeze))


class _Observed(NamedTuple):
    argument: str | None  # the model keyword that holds the site's data, None if unknown
    value: Any  # the observed value
    layout: SiteLayout  # of the value (batch + event)
    log_lik_layout: SiteLayout  # of log p (batch only)
    mask: np.ndarray | None  # laid out over the batch dims; None when every point is real


def _plates(site: Mapping[str, Any]) -> dict[int, str]:
    return {frame.dim: frame.name for frame in site.get("cond_indep_stack", ())}


def _rerunnable(result: FitResult, data: Mapping[str, Any]) -> FitResult:
    """``result`` with its not-estimated globals (``info["inactive_sites"]``, NaN) set to a
    prior draw, for re-running the model (traces, log-likelihoods, predictives), which a NaN
    scale would fail under validation. The observed sites do not depend on them given the
    task draws, so nothing computed from the re-run changes."""
    inactive = [s for s in result.info.get("inactive_sites", ()) if s in result.samples]
    if not inactive:
        return result
    finite = {k: np.asarray(v)[0, 0] for k, v in result.samples.items() if k not in inactive}
    with handlers.block(), handlers.seed(rng_seed=0):
        trace = handlers.trace(handlers.substitute(result.model, finite)).get_trace(**data)
    samples = dict(result.samples)
    for name in inactive:
        samples[name] = np.broadcast_to(np.asarray(trace[name]["value"]),
                                        np.shape(samples[name])).astype(float)
    return result._replace(samples=samples)


def _trace(model: Callable, samples: Mapping[str, Any], data: Mapping[str, Any]) -> dict:
    first = {k: np.asarray(v)[0, 0] for k, v in samples.items()}
    with handlers.block(), handlers.seed(rng_seed=0):
        return handlers.trace(handlers.substitute(model, first)).get_trace(**data)


def _argument_of(name: str, site: Mapping[str, Any], data: Mapping[str, Any]) -> str | None:
    """The model argument passed as ``obs`` to the site: the same object, else the argument
    of the site's name, else the one argument with equal values; ``None`` when ambiguous."""
    for key, value in data.items():
        if value is site["value"]:
            return key
    if name in data:
        return name
    matches = [k for k, v in data.items() if hasattr(v, "shape")
               and np.shape(v) == np.shape(site["value"])
               and np.array_equal(np.asarray(v), np.asarray(site["value"]))]
    return matches[0] if len(matches) == 1 else None


def _observed(trace: Mapping[str, Any], data: Mapping[str, Any], task_dim: str
              ) -> dict[str, _Observed]:
    out = {}
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        shape = tuple(np.shape(site["value"]))
        batch_ndim = len(shape) - len(site["fn"].event_shape)
        plates = _plates(site)
        layout = _layout(name, shape, batch_ndim, plates, task_dim)
        log_lik_layout = _layout(name, shape[:batch_ndim], batch_ndim, plates, task_dim)
        mask = site_mask(site["fn"])
        mask = None if mask is None else log_lik_layout.apply(mask, 0)
        out[name] = _Observed(_argument_of(name, site, data), site["value"], layout,
                              log_lik_layout, mask)
    return out


class _Coords(NamedTuple):
    task_dim: str
    labels: np.ndarray

    def of(self, dims: Sequence[str], shape: Sequence[int]) -> dict[str, np.ndarray]:
        return {d: self.labels if d == self.task_dim else np.arange(n)
                for d, n in zip(dims, shape, strict=True)}


def _data_array(values: np.ndarray, dims: Sequence[str], coords: _Coords,
                draws: np.ndarray | None = None) -> xr.DataArray:
    """``draws`` given: values carry leading (chain, draw) axes, draw coordinate ``draws``."""
    values = np.asarray(values)
    if draws is None:
        return xr.DataArray(values, dims=tuple(dims), coords=coords.of(dims, values.shape))
    lead = {"chain": np.arange(values.shape[0]), "draw": np.asarray(draws)}
    return xr.DataArray(values, dims=("chain", "draw", *dims),
                        coords={**lead, **coords.of(dims, values.shape[2:])})


def _masked_array(name: str, values: np.ndarray, site: _Observed, layout: SiteLayout,
                  coords: _Coords, draws: np.ndarray | None) -> xr.DataArray:
    """Keep the real points only, along one dim ``{name}_obs``, labelled by task and point."""
    lead = 0 if draws is None else 2
    kept = values[(slice(None),) * lead + (site.mask,)]
    dims = (f"{name}_obs", *layout.dims[layout.batch_ndim:])
    array = _data_array(kept, dims, coords, draws)
    position = np.nonzero(site.mask)
    for dim, index in zip(layout.dims[:layout.batch_ndim], position, strict=True):
        label = coords.labels[index] if dim == coords.task_dim else index
        array = array.assign_coords({f"{name}_{dim}": (f"{name}_obs", label)})
    return array


def _observed_array(name: str, values: Any, site: _Observed, coords: _Coords,
                    draws: np.ndarray | None = None, *, log_lik: bool = False
                    ) -> xr.DataArray:
    layout = site.log_lik_layout if log_lik else site.layout
    values = layout.apply(values, 0 if draws is None else 2)
    if site.mask is not None:
        return _masked_array(name, values, site, layout, coords, draws)
    return _data_array(values, layout.dims, coords, draws)


def _flat(samples: Mapping[str, np.ndarray], draws: np.ndarray | None = None
          ) -> dict[str, jax.Array]:
    out = {}
    for name, value in samples.items():
        value = np.asarray(value) if draws is None else np.asarray(value)[:, draws]
        out[name] = jax.numpy.asarray(value.reshape(-1, *value.shape[2:]))
    return out


def _unflat(value: Any, chains: int) -> np.ndarray:
    value = np.asarray(value)
    return value.reshape(chains, -1, *value.shape[1:])


class _Setup(NamedTuple):
    coords: _Coords
    trace: dict
    observed: dict[str, _Observed]


def _setup(result: FitResult, data: Mapping[str, Any], task_labels: Sequence | None
           ) -> _Setup:
    spec = model_structure(result.model, data)
    labels = np.arange(spec.subsample_size) if task_labels is None else np.asarray(
        list(task_labels))
    if labels.dtype == object:
        labels = labels.astype(str)
    if labels.shape != (spec.subsample_size,):
        raise ValueError(f"task_labels: expected {spec.subsample_size} labels (the tasks plate "
                         f"{spec.plate_name!r}), got shape {labels.shape}")
    trace = _trace(result.model, result.samples, data)
    coords = _Coords(spec.plate_name, labels)
    return _Setup(coords, trace, _observed(trace, data, spec.plate_name))


def pointwise_log_likelihood(result: FitResult, data: Mapping[str, Any] | None = None, *,
                             task_labels: Sequence | None = None,
                             setup: _Setup | None = None) -> dict[str, xr.DataArray]:
    """log p(y_ji | draw s) for every observed site, point and posterior draw.

    Args:
        result: the fit; its draws are used as they are (point sites repeated).
        data: the model's keyword arguments to score (default ``result.data``; pass a query
            set for held-out log-likelihoods).
        task_labels: coordinate of the tasks dimension.
        setup: internal, a precomputed trace of ``data``.

    Returns:
        Site name -> DataArray (chain, draw, tasks, points...), or, when the site is masked
        (ragged tasks), (chain, draw, ``{site}_obs``) over the real points only, with
        coordinates ``{site}_tasks``, ``{site}_points`` naming each point's task and position.
    """
    data = result.data if data is None else data
    result = _rerunnable(result, result.data)
    setup = _setup(result, data, task_labels) if setup is None else setup
    values = log_likelihood(result.model, _flat(result.samples), **data)
    draws = np.arange(result.num_draws)
    return {name: _observed_array(name, _unflat(values[name], result.num_chains), site,
                                  setup.coords, draws, log_lik=True)
            for name, site in setup.observed.items()}


def task_site_draws(result: FitResult, site: str, *, data: Mapping[str, Any] | None = None
                    ) -> np.ndarray:
    """Draws of one task site as (chain, draw, tasks, components).

    The within-task values (event and non-plate axes) are flattened into ``components`` in
    C order, after the broadcast size-1 axes are dropped: ``phi`` (chain, draw, tasks, 1, 2)
    gives (chain, draw, tasks, 2).
    """
    data = result.data if data is None else data
    spec = model_structure(result.model, data)
    if site not in {s.name for s in spec.task_sites}:
        raise ValueError(f"{site!r} is not a task site of the model; task sites: "
                         f"{[s.name for s in spec.task_sites]}")
    if site not in result.samples:
        raise ValueError(f"{result.method}: no draws of {site!r}; it has {list(result.samples)}")
    trace = _trace(result.model, {site: result.samples[site]}, data)
    value = np.asarray(result.samples[site])
    layout = _layout(site, value.shape[2:], value.ndim - 2 - trace[site]["fn"].event_dim,
                     _plates(trace[site]), spec.plate_name)
    laid = layout.apply(value, 2)
    return laid.reshape(*laid.shape[:3], -1)


def _posterior(result: FitResult, setup: _Setup) -> xr.Dataset:
    variables = {}
    for name, value in result.samples.items():
        value = np.asarray(value)
        site = setup.trace.get(name)
        if site is not None and site["type"] == "sample" and tuple(
                np.shape(site["value"])) != value.shape[2:]:
            raise ValueError(f"site {name!r}: the model gives shape {np.shape(site['value'])}, "
                             f"the draws {value.shape[2:]} after (chain, draw)")
        if site is not None and site["type"] == "sample":
            batch_ndim = value.ndim - 2 - site["fn"].event_dim
            layout = _layout(name, value.shape[2:], batch_ndim, _plates(site),
                             setup.coords.task_dim)
        else:
            layout = _layout(name, value.shape[2:], 0, {}, setup.coords.task_dim)
        variables[name] = _data_array(layout.apply(value, 2), layout.dims, setup.coords,
                                      np.arange(value.shape[1]))
    return xr.Dataset(variables)


def _sample_stats(result: FitResult, coords: _Coords) -> xr.Dataset | None:
    chains, draws = result.num_chains, result.num_draws
    variables = {}
    for name, value in result.sample_stats.items():
        value = np.asarray(value)
        if value.shape[:2] != (chains, draws):
            warnings.warn(f"sample_stats[{name!r}] has shape {value.shape}, not (chain, draw) "
                          f"= ({chains}, {draws}); left out of the InferenceData", stacklevel=3)
            continue
        stat = STAT_NAMES.get(name, name)
        variables[stat] = _data_array(value, [f"{stat}_dim_{i}" for i in range(value.ndim - 2)],
                                      coords, np.arange(draws))
    num_tasks = coords.labels.shape[0]
    for name, value in result.task_diagnostics.items():
        value = np.asarray(value)
        if value.shape not in ((), (num_tasks,), (chains, draws), (chains, draws, num_tasks)):
            raise ValueError(f"task_diagnostics[{name!r}]: expected shape (tasks,) = "
                             f"({num_tasks},) or (chain, draw, tasks) = ({chains}, {draws}, "
                             f"{num_tasks}), got {value.shape}")
        if value.ndim < 2 or value.shape[:2] != (chains, draws):
            value = np.broadcast_to(value, (chains, draws, *value.shape))  # at a point estimate
        dims = [coords.task_dim] if value.ndim == 3 else []
        variables[name] = _data_array(value, dims, coords, np.arange(draws))
    return xr.Dataset(variables) if variables else None


def _observed_arguments(observed: Mapping[str, _Observed], data: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """The data with every observed argument set to ``None``, so the model samples it."""
    return {k: None if k in {o.argument for o in observed.values()} else v
            for k, v in data.items()}


def _thinned(num_draws: int, num_predictive: int | None) -> np.ndarray:
    if num_predictive is None or num_predictive >= num_draws:
        return np.arange(num_draws)
    if num_predictive < 1:
        raise ValueError(f"num_predictive must be a positive number of draws per chain, "
                         f"got {num_predictive}")
    return np.unique(np.linspace(0, num_draws - 1, num_predictive).round().astype(int))


def _predictive(result: FitResult, data: Mapping[str, Any], setup: _Setup, rng_key: Any,
                draws: np.ndarray) -> dict[str, xr.DataArray]:
    unknown = [name for name, site in setup.observed.items() if site.argument is None]
    if unknown:
        warnings.warn(f"observed site(s) {unknown}: no model argument holds their data as "
                      "passed to `obs`, so they cannot be set to None for predictive draws; "
                      "predictive groups left out", stacklevel=3)
        return {}
    predictive = Predictive(result.model, posterior_samples=_flat(result.samples, draws),
                            return_sites=list(setup.observed))
    # The partitionable threefry (JAX's default) compiles N-D draws very slowly on CPU
    # (measured 7-10 s against 0.5-1 s for a (100, 8, 10) normal with JAX 0.10).
    with jax.threefry_partitionable(False):
        values = predictive(rng_key, **_observed_arguments(setup.observed, data))
    return {name: _observed_array(name, _unflat(values[name], result.num_chains), site,
                                  setup.coords, draws)
            for name, site in setup.observed.items()}


def _data_groups(data: Mapping[str, Any], setup: _Setup, observed_group: bool
                 ) -> tuple[xr.Dataset, xr.Dataset]:
    """(observed values, other array arguments); the latter keep padded points and masks.
    Without ``observed_group`` every argument goes to the second (a query set)."""
    observed, constant = {}, {}
    if observed_group:
        observed = {name: _observed_array(name, site.value, site, setup.coords)
                    for name, site in setup.observed.items()}
    arguments = {o.argument for o in setup.observed.values()} if observed_group else set()
    num_tasks = setup.coords.labels.shape[0]
    for key, value in data.items():
        if key in arguments or not hasattr(value, "shape") or np.ndim(value) == 0:
            continue
        value = np.asarray(value)
        dims = [f"{key}_dim_{i}" for i in range(value.ndim)]
        if value.shape[0] == num_tasks:
            dims[0] = setup.coords.task_dim
        constant[key] = _data_array(value, dims, setup.coords)
    return xr.Dataset(observed), xr.Dataset(constant)


def _attr(value: Any) -> str | int | float:
    """A netCDF-safe attribute: numbers and strings pass, bools become 0/1, ``None`` ''."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | float | str | np.integer | np.floating):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        return ",".join(str(v) for v in value)
    return str(value)


def _attrs(result: FitResult, task_dim: str, query: bool) -> dict[str, Any]:
    attrs = {"method": result.method, "wall_time": float(result.wall_time),
             "point_sites": ",".join(result.point_sites),
             "approximate": result.approximate or "", "task_dim": task_dim,
             "query": int(query)}
    attrs.update({f"info_{k}": _attr(v) for k, v in result.info.items()})
    # Globals the method's objective does not depend on are NaN in the posterior, not
    # estimates; say which and why where ArviZ users look (posterior.attrs).
    inactive = tuple(result.info.get("inactive_sites", ()))
    attrs["inactive_sites"] = ",".join(inactive)
    attrs["inactive_reason"] = result.info.get("inactive_reason", "") if inactive else ""
    return {k: _attr(v) for k, v in az.data.base.make_attrs(attrs, library=numpyro).items()}


def to_inference_data(result: FitResult, *, task_labels: Sequence | None = None,
                      query: Mapping[str, Any] | None = None, rng_key: Any = None,
                      num_predictive: int | None = None) -> az.InferenceData:
    """Export a fit to ArviZ, in one convention whatever the method.

    Groups:
        * ``posterior``: every site of ``result.samples``, dims (chain, draw, ...); task sites
          (chain, draw, tasks, ...) with the broadcast size-1 axes dropped.
        * ``log_likelihood``: log p(y_ji | draw s) per observed site of ``result.data``,
          e.g. ``y`` (chain, draw, tasks, points), for ``az.loo`` / ``az.waic``.
        * ``posterior_predictive``: the observed sites redrawn from the model with their data
          arguments set to ``None`` (``y=None``), same dims.
        * ``observed_data``: the observed values; ``constant_data``: the other array
          arguments (``x``, ``mask``...), task axis labelled, padding kept.
        * ``sample_stats``: NUTS statistics with ArviZ names (``diverging``, ``tree_depth``,
          ``energy``, ``acceptance_rate``, ``n_steps``, see :data:`STAT_NAMES`); statistics not
          shaped (chain, draw) are left out with a warning. Per-task diagnostics
          (``inner_grad_norm``, ``inner_converged``, ``curvature_min_eigenvalue``...) as
          (chain, draw, tasks); those computed once at a point estimate are repeated.
        * With ``query``: ``predictions`` holds the predictive draws of the observed sites on
          the query inputs (e.g. ``y``, (chain, draw, tasks, points)) and the held-out
          pointwise log-likelihood ``{site}_log_lik`` = log p(y_query_ji | draw s) on the
          same draws; ``predictions_constant_data`` holds every query argument, the observed
          ones included. The held-out log-likelihood is deliberately *not* in
          ``log_likelihood``: ArviZ's ``az.loo(idata)`` then needs no ``var_name``. The
          held-out log predictive density per point is
          ``logsumexp(idata.predictions.y_log_lik, dims=("chain", "draw")) - log(S)``.
        * The predictive groups need the argument each observed site takes as ``obs`` (the
          same object, else the argument named like the site, else the one argument with
          equal values); when that is ambiguous they are left out, with a warning.

    Ragged tasks: when an observed site is under :func:`numpyro.handlers.mask` (e.g. the radon
    model's boolean ``mask`` argument) and some points are masked out, its
    ``observed_data``, ``posterior_predictive``, ``log_likelihood`` and ``predictions``
    variables keep only the real points, along one dimension ``{site}_obs`` with coordinates
    ``{site}_{tasks}`` and ``{site}_{points}`` naming each point's task and position. Padded
    points are dropped rather than given log-likelihood 0, which would count them as data in
    ``az.loo``'s standard error and effective number of parameters.

    Point estimates: the sites named in ``result.point_sites`` (the globals of empirical
    Bayes, every site of an ``AutoDelta`` guide) are stored repeated along (chain, draw) so
    ArviZ summaries run; read their posterior mean as the estimate, their sd is 0 by
    construction and their R-hat and ESS are meaningless (NaN or warnings).

    Attributes (``idata.attrs`` and each group's): ``method``, ``wall_time`` (s),
    ``point_sites`` (comma-separated), ``approximate`` (empty when the method is exact in
    its own terms), ``task_dim``, ``query`` (0/1), ``inactive_sites`` (comma-separated globals
    the method did not estimate, e.g. ``"tau"`` under MAML; NaN in ``posterior``) and
    ``inactive_reason`` (why; both empty when none), ``info_*`` (``result.info``, strings
    and numbers), plus ArviZ's ``created_at`` etc. All are str or numbers, so the result
    round-trips through ``idata.to_netcdf(path)`` / ``az.from_netcdf(path)``.

    Args:
        result: any method's fit.
        task_labels: one label per task (e.g. ``TaskData.task_labels``); default 0..J-1.
        query: held-out data, the model's keyword arguments (task-major, same tasks).
        rng_key: key for the predictive draws (default ``PRNGKey(0)``).
        num_predictive: draws per chain used for the predictive groups, evenly thinned
            (their ``draw`` coordinate names the posterior draws used); default all.

    Returns:
        The ``arviz.InferenceData``.

    Examples:
        >>> idata = to_inference_data(fit, task_labels=data.task_labels)  # doctest: +SKIP
        >>> idata.posterior.phi.dims  # doctest: +SKIP
        ('chain', 'draw', 'tasks', 'phi_dim_0')
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    key_posterior, key_query = jax.random.split(rng_key)
    posterior = result  # not-estimated globals stay NaN there
    result = _rerunnable(result, result.data)
    setup = _setup(result, result.data, task_labels)
    draws = _thinned(result.num_draws, num_predictive)
    observed, constant = _data_groups(result.data, setup, observed_group=True)
    groups = {
        "posterior": _posterior(posterior, setup),
        "log_likelihood": xr.Dataset(pointwise_log_likelihood(result, setup=setup)),
        "posterior_predictive": xr.Dataset(
            _predictive(result, result.data, setup, key_posterior, draws)),
        "observed_data": observed,
        "constant_data": constant,
        "sample_stats": _sample_stats(result, setup.coords),
    }
    if query is not None:
        groups.update(_query_groups(result, query, task_labels, key_query, draws))
    attrs = _attrs(result, setup.coords.task_dim, query is not None)
    datasets = {k: v.assign_attrs(attrs) for k, v in groups.items()
                if v is not None and (v.data_vars or k == "posterior")}
    idata = az.InferenceData(**datasets)
    idata.attrs = attrs
    return idata


def _query_groups(result: FitResult, query: Mapping[str, Any], task_labels: Sequence | None,
                  rng_key: Any, draws: np.ndarray) -> dict[str, xr.Dataset]:
    setup = _setup(result, query, task_labels)
    thinned = result._replace(samples={k: np.asarray(v)[:, draws]
                                       for k, v in result.samples.items()})
    predictions = _predictive(result, query, setup, rng_key, draws)
    log_lik = pointwise_log_likelihood(thinned, query, setup=setup)
    for name, value in log_lik.items():
        predictions[f"{name}_log_lik"] = value.assign_coords(draw=draws)
    _, constant = _data_groups(query, setup, observed_group=False)
    return {"predictions": xr.Dataset(predictions), "predictions_constant_data": constant}

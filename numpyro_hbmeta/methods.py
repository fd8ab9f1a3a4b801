"""Method runners for ``hbmeta compare``: a zoo model and its data in, a FitResult out.

Each entry of :data:`METHODS` fits a zoo model (a module of :mod:`numpyro_hbmeta.models`) with
the settings the module asks for in its optional ``FIT`` dict (merged over the defaults
below) and returns a :class:`~numpyro_hbmeta.results.FitResult`. Samplers and the Laplace
evidence see all of a task's data (support and query joined); MAML and LLAMA adapt on the
support set and score the query set, as in meta-learning.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import optax

from numpyro_hbmeta import baselines
from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.inner import Newton, TruncatedGD
from numpyro_hbmeta.results import FitResult

__all__ = ["DEFAULTS", "METHODS", "run_method", "settings"]

DEFAULTS: dict[str, Any] = {
    "maml_steps": 5, "maml_step_size": 0.005, "eb_steps": 2000, "eb_learning_rate": 0.02,
    "nuts_warmup": 500, "nuts_samples": 1000, "nuts_chains": 2, "svi_steps": 5000,
    "svi_learning_rate": 0.01, "num_samples": 1000, "llama_curvature": "full",
    "llama_eta": 1e-6,
}
SMALL: dict[str, Any] = {"eb_steps": 500, "nuts_warmup": 300, "nuts_samples": 300,
                         "nuts_chains": 1, "svi_steps": 1000, "num_samples": 300}


def settings(zoo: ModuleType, small: bool) -> dict[str, Any]:
    """The defaults, updated by the zoo module's ``FIT`` and, when ``small``, shortened."""
    merged = {**DEFAULTS, **getattr(zoo, "FIT", {})}
    if small:
        merged.update({k: min(v, merged[k]) for k, v in SMALL.items()})
    return merged


def _eb(objective: str) -> Callable[..., FitResult]:
    def run(zoo, data: TaskData, rng_key, *, small=False, progress_bar=True) -> FitResult:
        s = settings(zoo, small)
        if objective == "laplace":
            inner, support, query = Newton(), data.all_data(), None
        else:
            if data.query is None:
                raise ValueError(f"{objective} scores a query set, and {zoo.__name__} has none")
            inner = TruncatedGD(s["maml_steps"], s["maml_step_size"])
            support, query = data.support, data.query
        init = None
        if hasattr(zoo, "init_params"):  # the model's own start (LeCun for the networks)
            key_init, rng_key = jax.random.split(rng_key)
            init = zoo.init_params(key_init)
        result = baselines.run_eb(
            zoo.model, support, rng_key, objective=objective, inner=inner, query=query,
            num_steps=s["eb_steps"], optimizer=optax.adam(s["eb_learning_rate"]),
            num_samples=s["num_samples"], curvature=s["llama_curvature"],
            eta=s["llama_eta"], init_params=init, task_draws=s.get("task_draws", True),
            progress_bar=progress_bar)
        if objective == "laplace" and getattr(zoo, "LAPLACE_EXACT", False):
            return result._replace(approximate="point estimate of the globals (empirical "
                                               "Bayes); Laplace evidence exact for this model")
        return result

    run.__doc__ = f"MetaEB with objective={objective!r} on a zoo model."
    return run


def _nuts(zoo, data: TaskData, rng_key, *, small=False, progress_bar=True) -> FitResult:
    """NUTS on the full model, all of each task's data."""
    s = settings(zoo, small)
    return baselines.run_nuts(zoo.model, data.all_data(), rng_key, num_warmup=s["nuts_warmup"],
                              num_samples=s["nuts_samples"], num_chains=s["nuts_chains"],
                              progress_bar=progress_bar)


def _nuts_marginal(zoo, data: TaskData, rng_key, *, small=False, progress_bar=True
                   ) -> FitResult:
    """NUTS over the globals of the Laplace marginal (tasks marginalised)."""
    s = settings(zoo, small)
    result = baselines.run_nuts_marginal(
        zoo.model, data.all_data(), rng_key, num_warmup=s["nuts_warmup"],
        num_samples=s["nuts_samples"], num_chains=s["nuts_chains"], progress_bar=progress_bar)
    if not getattr(zoo, "LAPLACE_EXACT", False):
        result = result._replace(approximate="Laplace marginal of non-Gaussian tasks")
    return result


def _svi(guide: str) -> Callable[..., FitResult]:
    def run(zoo, data: TaskData, rng_key, *, small=False, progress_bar=True) -> FitResult:
        s = settings(zoo, small)
        return baselines.run_svi(zoo.model, data.all_data(), rng_key, guide=guide,
                                 num_steps=s["svi_steps"], learning_rate=s["svi_learning_rate"],
                                 num_samples=s["num_samples"], progress_bar=progress_bar)

    run.__doc__ = f"SVI with the {guide} autoguide."
    return run


METHODS: dict[str, Callable[..., FitResult]] = {
    "maml": _eb("maml"),
    "llama": _eb("llama"),
    "laplace": _eb("laplace"),
    "nuts": _nuts,
    "nuts_marginal": _nuts_marginal,
    "svi_normal": _svi("normal"),
    "svi_lowrank": _svi("lowrank"),
    "svi_delta": _svi("delta"),
}
METHODS["svi"] = METHODS["svi_normal"]


def run_method(name: str, zoo: ModuleType, data: TaskData, rng_key, *, small: bool = False,
               progress_bar: bool = True) -> FitResult:
    """Run method ``name`` on a zoo model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](zoo, data, rng_key, small=small, progress_bar=progress_bar)

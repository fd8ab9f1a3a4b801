"""Method runners for ``hbmeta compare``: one function per method, one result type.

Each runner fits a zoo model (a module of :mod:`numpyro_hbmeta.models`) on its data and
returns a :class:`MethodResult` holding draws (samplers) or point estimates (empirical Bayes)
of the global sites. New methods register in :data:`METHODS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.eb import MetaEB
from numpyro_hbmeta.inner import Newton, TruncatedGD

__all__ = ["METHODS", "MethodResult", "run_method"]


class MethodResult(NamedTuple):
    """What one method gives about the globals.

    Attributes:
        method: method name.
        globals_: site -> draws with a leading (draws,) axis (samplers), or the point
            estimate itself (``point=True``).
        point: whether ``globals_`` are point estimates.
        wall_time: seconds, compilation included.
        inactive_sites: globals the method's objective does not depend on.
        info: method-specific diagnostics (divergences, final loss, ...).
    """

    method: str
    globals_: dict[str, np.ndarray]
    point: bool
    wall_time: float
    inactive_sites: tuple[str, ...] = ()
    info: dict[str, Any] = {}  # noqa: RUF012 - NamedTuple default, never mutated


def _settings(zoo: ModuleType, small: bool) -> dict[str, Any]:
    defaults = {"maml_steps": 5, "maml_step_size": 0.005, "eb_steps": 2000,
                "eb_learning_rate": 0.02, "nuts_warmup": 500, "nuts_samples": 1000,
                "nuts_chains": 2}
    defaults.update(getattr(zoo, "FIT", {}))
    if small:
        defaults.update(eb_steps=min(defaults["eb_steps"], 500), nuts_warmup=300,
                        nuts_samples=300, nuts_chains=1)
    return defaults


def _eb(zoo: ModuleType, data: TaskData, rng_key, small: bool, progress_bar: bool,
        *, objective: str, inner) -> MethodResult:
    import optax

    settings = _settings(zoo, small)
    driver = MetaEB(zoo.model, inner=inner, objective=objective,
                    optimizer=optax.adam(settings["eb_learning_rate"]))
    args = (data.all_data(),) if objective == "laplace" else (data.support, data.query)
    start = time.perf_counter()
    result = driver.run(rng_key, settings["eb_steps"], *args, progress_bar=progress_bar)
    jax.block_until_ready(result.params)
    elapsed = time.perf_counter() - start
    return MethodResult(objective, {k: np.asarray(v) for k, v in result.params.items()}, True,
                        elapsed, result.inactive_sites,
                        {"final_loss": float(result.losses[-1])})


def run_maml(zoo, data, rng_key, *, small=False, progress_bar=True) -> MethodResult:
    """MAML: type-II ML of the query likelihood after K inner GD steps (implicit prior)."""
    if data.query is None:
        raise ValueError(f"model {zoo.__name__} has no query set; maml needs one")
    settings = _settings(zoo, small)
    inner = TruncatedGD(settings["maml_steps"], settings["maml_step_size"])
    return _eb(zoo, data, rng_key, small, progress_bar, objective="maml", inner=inner)


def run_laplace(zoo, data, rng_key, *, small=False, progress_bar=True) -> MethodResult:
    """Laplace empirical Bayes: type-II ML of the Laplace evidence with Newton task MAPs."""
    return _eb(zoo, data, rng_key, small, progress_bar, objective="laplace", inner=Newton())


def run_nuts(zoo, data, rng_key, *, small=False, progress_bar=True) -> MethodResult:
    """NUTS on the full model (all of each task's data), the gold standard."""
    settings = _settings(zoo, small)
    chains = min(settings["nuts_chains"], jax.local_device_count()) or 1
    mcmc = MCMC(NUTS(zoo.model), num_warmup=settings["nuts_warmup"],
                num_samples=settings["nuts_samples"], num_chains=chains,
                chain_method="parallel" if chains > 1 else "sequential",
                progress_bar=progress_bar)
    start = time.perf_counter()
    mcmc.run(rng_key, **data.all_data())
    samples = mcmc.get_samples()
    jax.block_until_ready(samples)
    elapsed = time.perf_counter() - start
    globals_ = getattr(zoo, "GLOBALS", None) or [k for k in samples if k not in zoo.TASK_SITES]
    divergences = int(jnp.sum(mcmc.get_extra_fields()["diverging"]))
    return MethodResult("nuts", {k: np.asarray(samples[k]) for k in globals_}, False, elapsed,
                        (), {"divergences": divergences, "chains": chains})


METHODS: dict[str, Callable[..., MethodResult]] = {
    "maml": run_maml,
    "laplace": run_laplace,
    "nuts": run_nuts,
}


def run_method(name: str, zoo: ModuleType, data: TaskData, rng_key, *, small: bool = False,
               progress_bar: bool = True) -> MethodResult:
    """Run method ``name`` on a zoo model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](zoo, data, rng_key, small=small, progress_bar=progress_bar)

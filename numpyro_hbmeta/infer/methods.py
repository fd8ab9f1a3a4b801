"""Method runners for ``hbmeta compare``: a zoo model and its data in, a FitResult out.

Each entry of :data:`METHODS` fits a :class:`~numpyro_hbmeta.zoo.ZooModel` with the model's
typed :class:`~numpyro_hbmeta.zoo.FitSettings` and returns a
:class:`~numpyro_hbmeta.infer.results.FitResult`. Samplers and the Laplace evidence see all of a
task's data (support and query joined); MAML and LLAMA adapt on the support set and score the
query set, as in meta-learning.

MAML's inner step from the data (:func:`stable_step_size`): gradient descent on a task's
support negative log-likelihood contracts, and K steps of it equal MAP under a Gaussian prior
(the implicit prior, Grant et al., ICLR 2018, §3.2), only where β·λ < 1 for every eigenvalue λ
of the Hessian. One fixed β cannot suit tasks whose curvature differs a hundredfold (radon's
counties hold 1 to 116 houses), so where a model leaves ``maml_step_size=None`` the runner
takes β = c / max_j λ_max,j, λ_max,j the largest eigenvalue of task j's support NLL Hessian at
the start of the fit, c = ``maml_step_fraction`` (0.5). The globals still move during the
fit: a learnt noise scale σ rescales the Hessian by 1/σ², and MAML learns σ partly as an
inner learning rate, so β·λ can pass 1 at the *fitted* globals; the task posterior is then
not formed and the result says so (``info["task_posterior"]``), see
:func:`numpyro_hbmeta.infer.baselines.run_eb`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature import hessian_blocks
from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.infer import baselines
from numpyro_hbmeta.infer.eb import MetaEB
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.inner import Newton, TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import meta_marginal
from numpyro_hbmeta.zoo import ZooModel

__all__ = ["DESCRIPTIONS", "METHODS", "QUERY_METHODS", "run_method", "stable_step_size",
           "support_max_eigenvalues"]

Runner = Callable[..., FitResult]

#: One line per method, for ``hbmeta compare --help``.
DESCRIPTIONS: dict[str, str] = {
    "maml": "MAML: globals by type-II ML of the query likelihood after K inner GD steps",
    "llama": "LLAMA: MAML plus the Laplace log-det penalty of the query curvature",
    "laplace": "Laplace empirical Bayes: globals maximising the Laplace evidence (Newton)",
    "nuts": "NUTS on the full model (globals and every task): the reference",
    "nuts_marginal": "NUTS over the globals of the Laplace marginal (tasks marginalised)",
    "svi_normal": "SVI with AutoNormal (mean-field Gaussian)",
    "svi_lowrank": "SVI with AutoLowRankMultivariateNormal",
    "svi_delta": "SVI with AutoDelta (MAP of every site)",
    "svi": "alias of svi_normal",
}


def support_max_eigenvalues(model: Callable, params: Mapping[str, Any],
                            support: Mapping[str, Any]) -> np.ndarray:
    """λ_max,j of each task's support negative-log-likelihood Hessian at φ_j⁰ = E[φ_j | θ],
    at the constrained globals ``params``: shape (tasks,). The Hessian is the one MAML's
    implicit prior is built from (:func:`numpyro_hbmeta.infer.implicit_prior.implicit_prior`)."""
    # The inner solver only names the loss (implicit prior: support NLL); its step is unused.
    marginal = meta_marginal(model, inner=TruncatedGD(1, 1.0), objective="maml")
    context = context_at(model, params, support)
    # Once per fit, eagerly: a jit here would compile for every call's data.
    hessians = hessian_blocks(marginal.inner_loss(context, dict(support)), context.phi0)
    hessians = 0.5 * (hessians + jnp.swapaxes(hessians, -1, -2))
    return np.asarray(linalg.eigvalsh(hessians)[..., -1])


def stable_step_size(model: Callable, params: Mapping[str, Any], support: Mapping[str, Any],
                     *, fraction: float = 0.5) -> float:
    """β = ``fraction`` / max_j λ_max,j (:func:`support_max_eigenvalues` at ``params``).

    With 0 < ``fraction`` < 1, β·λ ≤ ``fraction`` < 1 for every eigenvalue of every task at
    ``params``: the inner gradient descent contracts and its implicit prior exists there.

    Raises:
        FloatingPointError: no task has a positive finite curvature to scale by.
    """
    largest = support_max_eigenvalues(model, params, support)
    top = float(np.max(largest))
    if not (np.isfinite(largest).all() and top > 0):
        raise FloatingPointError(f"stable_step_size: the support NLL Hessians have largest "
                                 f"eigenvalues {largest.tolist()} at {dict(params)}; no step "
                                 "size can be chosen from them")
    return fraction / top


def _start(zoo: ZooModel, driver: MetaEB, data: TaskData, rng_key, query) -> dict[str, Any]:
    """The constrained globals MetaEB starts from: the model's own ``init_params`` hook, or
    MetaEB's uniform start for this key, made explicit so β can be read off it."""
    if zoo.init_params is not None:
        return dict(zoo.init_params(rng_key))
    state = driver.init(rng_key, data.support, query)
    return {k: jnp.asarray(v) for k, v in driver._constrained(state.params, data.support,
                                                               query).items()}


def _reference_point(driver: MetaEB, data: TaskData, query) -> dict[str, Any]:
    """The globals at unconstrained 0 (locations 0, scales 1): a fixed point to read the
    curvature's scale at, unlike the random start, whose scales vary 50-fold (e^±2)."""
    state = driver.init(jax.random.PRNGKey(0), data.support, query)
    zeros = {k: jnp.zeros_like(v) for k, v in state.params.items()}
    return {k: jnp.asarray(v) for k, v in driver._constrained(zeros, data.support,
                                                              query).items()}


def _inner_step(zoo: ZooModel, data: TaskData, reference: Mapping[str, Any], small: bool
                ) -> tuple[float, str]:
    s = zoo.settings(small=small)
    if s.maml_step_size is not None:
        return s.maml_step_size, "fixed by the model"
    beta = stable_step_size(zoo.model, reference, data.support, fraction=s.maml_step_fraction)
    return beta, (f"{s.maml_step_fraction} / max_j λ_max,j with the globals at unconstrained 0 "
                  "(scales 1)")


def _eb(objective: str) -> Runner:
    def run(zoo: ZooModel, data: TaskData, rng_key, *, small=False, progress_bar=True
            ) -> FitResult:
        s = zoo.settings(small=small)
        key_init, rng_key = jax.random.split(rng_key)
        info: dict[str, Any] = {}
        if objective == "laplace":
            inner, support, query = Newton(), data.all_data(), None
            probe = MetaEB(zoo.model, inner=inner, objective=objective)
        else:
            if data.query is None:
                raise ValueError(f"{objective} scores a query set, and {zoo.name} has none")
            support, query = data.support, data.query
            probe = MetaEB(zoo.model, inner=TruncatedGD(1, 1.0), objective=objective)
        init = _start(zoo, probe, data, key_init, query) if (
            objective != "laplace" or zoo.init_params is not None) else None
        if objective != "laplace":
            step_size, rule = _inner_step(zoo, data, _reference_point(probe, data, query),
                                          small)
            inner = TruncatedGD(s.maml_steps, step_size)
            info = {"inner_step_rule": rule}
        result = baselines.run_eb(
            zoo.model, support, rng_key, objective=objective, inner=inner, query=query,
            num_steps=s.eb_steps, optimizer=optax.adam(s.eb_learning_rate),
            num_samples=s.num_samples, curvature=s.llama_curvature, eta=s.llama_eta,
            init_params=init, task_draws=s.task_draws,
            posterior_curvature=s.posterior_curvature, progress_bar=progress_bar)
        result = result._replace(info={**result.info, **info})
        if objective == "laplace" and zoo.laplace_exact:
            return result._replace(approximate="point estimate of the globals (empirical "
                                               "Bayes); Laplace evidence exact for this model")
        return result

    run.__doc__ = f"MetaEB with objective={objective!r} on a zoo model."
    return run


def _nuts(zoo: ZooModel, data: TaskData, rng_key, *, small=False, progress_bar=True
          ) -> FitResult:
    """NUTS on the full model, all of each task's data."""
    s = zoo.settings(small=small)
    return baselines.run_nuts(zoo.model, data.all_data(), rng_key, num_warmup=s.nuts_warmup,
                              num_samples=s.nuts_samples, num_chains=s.nuts_chains,
                              progress_bar=progress_bar)


def _nuts_marginal(zoo: ZooModel, data: TaskData, rng_key, *, small=False, progress_bar=True
                   ) -> FitResult:
    """NUTS over the globals of the Laplace marginal (tasks marginalised)."""
    s = zoo.settings(small=small)
    result = baselines.run_nuts_marginal(
        zoo.model, data.all_data(), rng_key, num_warmup=s.nuts_warmup,
        num_samples=s.nuts_samples, num_chains=s.nuts_chains, progress_bar=progress_bar)
    if not zoo.laplace_exact:
        result = result._replace(approximate="Laplace marginal of non-Gaussian tasks")
    return result


def _svi(guide: str) -> Runner:
    def run(zoo: ZooModel, data: TaskData, rng_key, *, small=False, progress_bar=True
            ) -> FitResult:
        s = zoo.settings(small=small)
        return baselines.run_svi(zoo.model, data.all_data(), rng_key, guide=guide,
                                 num_steps=s.svi_steps, learning_rate=s.svi_learning_rate,
                                 num_samples=s.num_samples, progress_bar=progress_bar)

    run.__doc__ = f"SVI with the {guide} autoguide."
    return run


METHODS: dict[str, Runner] = {
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

#: Methods that score a query set (skipped by ``hbmeta compare`` on a model without one).
QUERY_METHODS = ("maml", "llama")


def run_method(name: str, zoo: ZooModel, data: TaskData, rng_key, *, small: bool = False,
               progress_bar: bool = True) -> FitResult:
    """Run method ``name`` on a zoo model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](zoo, data, rng_key, small=small, progress_bar=progress_bar)

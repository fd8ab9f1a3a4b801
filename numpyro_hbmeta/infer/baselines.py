"""Fits of one hierarchical model by every method, each returning a :class:`FitResult`.

* :func:`run_nuts` — NUTS on the full model (θ and every φ_j): the gold standard.
* :func:`run_nuts_marginal` — NUTS over the globals of ``meta_marginal(..., "laplace",
  Newton())`` (tasks marginalised by Laplace, INLA-style); task draws come from each θ draw's
  Laplace Gaussian, so they mix over the posterior of θ.
* :func:`run_svi` — SVI with ``AutoNormal``, ``AutoLowRankMultivariateNormal`` or
  ``AutoDelta``.
* :func:`run_eb` — :class:`~numpyro_hbmeta.MetaEB` point estimates of the globals and the
  Laplace task posterior at them (MAML / LLAMA / Laplace empirical Bayes).

The user's model function is passed unchanged to all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO, autoguide

from numpyro_hbmeta import sites, validate
from numpyro_hbmeta.curvature import FullCurvature, hessian_blocks
from numpyro_hbmeta.infer.checks import INACTIVE_REASON
from numpyro_hbmeta.infer.eb import MetaEB
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.inner import Newton, TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import meta_marginal

__all__ = ["GUIDES", "run_eb", "run_nuts", "run_nuts_marginal", "run_svi"]

GUIDES = {
    "normal": autoguide.AutoNormal,
    "lowrank": autoguide.AutoLowRankMultivariateNormal,
    "delta": autoguide.AutoDelta,
}


def _numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items()}


def _mcmc(model: Callable, data: Mapping[str, Any], rng_key, *, num_warmup: int,
          num_samples: int, num_chains: int, progress_bar: bool) -> tuple[MCMC, float]:
    num_warmup = validate.non_negative_int(num_warmup, "num_warmup")
    num_samples = validate.positive_int(num_samples, "num_samples")
    num_chains = validate.positive_int(num_chains, "num_chains")
    chains = max(1, min(num_chains, jax.local_device_count()))
    if chains < num_chains:
        chain_method = "sequential"
        chains = num_chains
    else:
        chain_method = "parallel" if chains > 1 else "sequential"
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, num_chains=chains,
                chain_method=chain_method, progress_bar=progress_bar)
    start = time.perf_counter()
    mcmc.run(rng_key, extra_fields=("num_steps", "accept_prob", "energy", "diverging"), **data)
    jax.block_until_ready(mcmc.get_samples())
    return mcmc, time.perf_counter() - start


def _nuts_stats(mcmc: MCMC) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    extra = mcmc.get_extra_fields(group_by_chain=True)
    stats = {"diverging": np.asarray(extra["diverging"])}
    for name in ("num_steps", "accept_prob", "energy"):
        if name in extra:
            stats[name] = np.asarray(extra[name])
    stats["tree_depth"] = np.floor(np.log2(np.maximum(stats.pop("num_steps", 1), 1)) + 1)
    return stats, {"divergences": int(stats["diverging"].sum()),
                   "chains": mcmc.num_chains}


def run_nuts(model: Callable, data: Mapping[str, Any], rng_key, *, num_warmup: int = 500,
             num_samples: int = 1000, num_chains: int = 2, progress_bar: bool = True
             ) -> FitResult:
    """NUTS on the full model. Chains run in parallel when host devices allow
    (``numpyro.set_host_device_count``), else one after another."""
    data = validate.task_data(data, "data")
    mcmc, elapsed = _mcmc(model, data, rng_key, num_warmup=num_warmup, num_samples=num_samples,
                          num_chains=num_chains, progress_bar=progress_bar)
    stats, info = _nuts_stats(mcmc)
    return FitResult("nuts", model, dict(data), _numpy(mcmc.get_samples(group_by_chain=True)),
                     sample_stats=stats, wall_time=elapsed, info=info)


def _laplace_draws(model: Callable, data: Mapping[str, Any], globals_draws, rng_key,
                   inner) -> dict[str, jnp.ndarray]:
    """One draw of every task site from the Laplace Gaussian at each draw of the globals:
    N(φ̂_j, H_j⁻¹), H_j the Hessian of the task's negative log joint at its MAP φ̂_j."""
    marginal = meta_marginal(model, inner=inner, objective="laplace")
    context = context_at(model, {k: v[0, 0] for k, v in globals_draws.items()}, data)

    def one(params, key):
        at = context_at(model, params, data)
        phi_hat, _ = marginal.solve(at, data)
        density = at.log_density(model, data)
        precision = hessian_blocks(lambda p: -density(p).log_joint, phi_hat)
        return context.constrained(phi_hat + FullCurvature(precision).sample(key, 1)[0])

    chains, draws = next(iter(globals_draws.values())).shape[:2]
    flat = {k: jnp.reshape(v, (chains * draws, *v.shape[2:])) for k, v in globals_draws.items()}
    keys = jax.random.split(rng_key, chains * draws)
    out = jax.jit(jax.vmap(one))(flat, keys)
    return {k: jnp.reshape(v, (chains, draws, *v.shape[1:])) for k, v in out.items()}


def run_nuts_marginal(model: Callable, data: Mapping[str, Any], rng_key, *,
                      num_warmup: int = 500, num_samples: int = 1000, num_chains: int = 2,
                      inner: Newton | None = None, progress_bar: bool = True) -> FitResult:
    """NUTS over θ on the Laplace marginal; task draws from the Laplace Gaussian per draw."""
    inner = Newton() if inner is None else inner
    data = validate.task_data(data, "data")
    key_mcmc, key_tasks = jax.random.split(rng_key)
    marginal = meta_marginal(model, inner=inner, objective="laplace")
    spec = marginal.check(data)  # data, shapes, independent tasks: before sampling
    mcmc, elapsed = _mcmc(lambda **d: marginal(d), data, key_mcmc, num_warmup=num_warmup,
                          num_samples=num_samples, num_chains=num_chains,
                          progress_bar=progress_bar)
    draws = mcmc.get_samples(group_by_chain=True)
    globals_ = {k: draws[k] for k in spec.global_sites}
    start = time.perf_counter()
    tasks = _laplace_draws(model, data, globals_, key_tasks, inner)
    elapsed += time.perf_counter() - start
    stats, info = _nuts_stats(mcmc)
    diagnostics = {k.removeprefix(sites.PREFIX): np.asarray(v) for k, v in draws.items()
                   if k.startswith(sites.PREFIX)}
    return FitResult("nuts_marginal", model, dict(data), _numpy({**globals_, **tasks}),
                     task_diagnostics=diagnostics, sample_stats=stats, wall_time=elapsed,
                     info=info)


def run_svi(model: Callable, data: Mapping[str, Any], rng_key, *, guide: str = "normal",
            num_steps: int = 5000, learning_rate: float = 0.01, num_samples: int = 1000,
            progress_bar: bool = True) -> FitResult:
    """SVI with an autoguide (``"normal"``, ``"lowrank"`` or ``"delta"``)."""
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {tuple(GUIDES)}, got {guide!r}")
    data = validate.task_data(data, "data")
    num_steps = validate.positive_int(num_steps, "num_steps")
    num_samples = validate.positive_int(num_samples, "num_samples")
    learning_rate = validate.positive_number(learning_rate, "learning_rate")
    auto = GUIDES[guide](model)
    svi = SVI(model, auto, optax.adam(learning_rate), Trace_ELBO())
    key_fit, key_draws = jax.random.split(rng_key)
    start = time.perf_counter()
    result = svi.run(key_fit, num_steps, progress_bar=progress_bar, **data)
    draws = auto.sample_posterior(key_draws, result.params, sample_shape=(1, num_samples))
    jax.block_until_ready(draws)
    elapsed = time.perf_counter() - start
    losses = np.asarray(result.losses)
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"SVI ({guide}) ended with a non-finite ELBO loss")
    latent = {k: v for k, v in draws.items() if not k.startswith("_")}
    point = tuple(latent) if guide == "delta" else ()
    return FitResult(f"svi_{guide}", model, dict(data), _numpy(latent), point_sites=point,
                     wall_time=elapsed, info={"final_loss": float(losses[-1]),
                                              "num_steps": num_steps},
                     approximate=f"variational ({GUIDES[guide].__name__})")


def run_eb(model: Callable, support: Mapping[str, Any], rng_key, *, objective: str,
           inner: TruncatedGD | Newton, query: Mapping[str, Any] | None = None,
           num_steps: int = 2000, optimizer=None, num_samples: int = 1000,
           curvature: str = "full", eta: float = 1e-6,
           init_params: Mapping[str, Any] | None = None, task_draws: bool = True,
           posterior_curvature: Any = None, progress_bar: bool = True) -> FitResult:
    """MetaEB point estimates of the globals and task draws from the Laplace task posterior
    at them (under MAML's implicit prior for ``prior="implicit"``).

    ``posterior_curvature`` is the curvature of the task posterior the draws come from
    (:func:`~numpyro_hbmeta.infer.posterior.laplace_task_posterior`): a name or builder such as
    ``"ggn"`` or ``KFAC(damping=...)``, kept in its structure (low rank plus diagonal,
    Kronecker), so a network's task posterior is drawn without a dense d × d matrix;
    ``None``: the fit's own ``curvature``. It is checked against the objective before the
    fit (``laplace`` needs the curvature of the log joint: ``"full"`` or ``"diag"``) and
    named in ``info["posterior_curvature"]``. With ``task_draws=False`` only the globals
    are returned (no task posterior, no inner diagnostics).

    Not estimates, so not exported as such:
        * globals the objective does not depend on (``MetaEBResult.inactive_sites``, e.g. τ
          under MAML, whose implicit prior replaces p(φ | θ)) are NaN in ``samples``, named in
          ``info["inactive_sites"]`` with ``info["inactive_reason"]``; their start value is
          still what the task posterior is computed at (it does not depend on them);
        * when the task posterior has no Laplace approximation at the estimate (a
          precision that is not positive definite; under MAML β·λ ≥ 1 at the fitted globals)
          only the globals are returned and ``info["task_posterior"]`` says why.
    """
    driver = MetaEB(model, inner=inner, objective=objective, curvature=curvature,
                    optimizer=optimizer, eta=eta)
    # The posterior's own driver, built (and its curvature checked) before the fit.
    posterior = driver if posterior_curvature is None else MetaEB(
        model, inner=inner, objective=objective, curvature=posterior_curvature, eta=eta)
    key_fit, key_draws = jax.random.split(rng_key)
    start = time.perf_counter()
    fit = driver.run(key_fit, num_steps, support, query, progress_bar=progress_bar,
                     init_params=init_params)
    info: dict[str, Any] = {"final_loss": float(fit.losses[-1]), "num_steps": num_steps}
    if isinstance(inner, TruncatedGD):
        info.update(inner_num_steps=inner.num_steps, inner_step_size=inner.step_size)
    samples, diagnostics = None, {}
    if task_draws:
        info["posterior_curvature"] = str(posterior.curvature)
        try:
            draws = posterior.sample_posterior(key_draws, fit.params, support, num_samples)
        except FloatingPointError as error:  # reported, never replaced by another Gaussian
            info["task_posterior"] = f"not formed: {error}"
        else:
            jax.block_until_ready(draws)
            samples = {k: np.asarray(v)[None] for k, v in draws.items()}
            diagnostics = _eb_diagnostics(driver, fit.params, support)
    if samples is None:
        samples = {k: np.asarray(v)[None, None] for k, v in fit.params.items()}
    elapsed = time.perf_counter() - start
    for name in fit.inactive_sites:  # the start value, not an estimate
        samples[name] = np.full_like(samples[name], np.nan, dtype=float)
    info.update(inactive_sites=fit.inactive_sites, boundary_sites=fit.boundary_sites)
    if fit.inactive_sites:
        info["inactive_reason"] = INACTIVE_REASON.format(objective=objective)
    return FitResult(objective, model, dict(support), samples, point_sites=tuple(fit.params),
                     task_diagnostics=diagnostics, wall_time=elapsed, info=info,
                     approximate="point estimate of the globals (empirical Bayes)")




def _eb_diagnostics(driver: MetaEB, params, support) -> dict[str, np.ndarray]:
    context = context_at(driver.model, params, support)
    _, info = jax.jit(lambda: driver.marginal.solve(context, support))()
    return {"inner_grad_norm": np.asarray(info.grad_norm),
            "inner_num_steps": np.asarray(info.num_steps),
            "inner_converged": np.asarray(info.converged)}

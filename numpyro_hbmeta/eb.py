"""``MetaEB``: point estimates of the globals, the way meta-learning fits them.

Type-II maximum likelihood (empirical Bayes) maximises Σ_j objective_j(θ) over the globals;
with ``hyperprior=True`` it adds log p(θ) (MAP-II). With ``objective="maml"`` this is MAML's
meta-training (Grant et al., ICLR 2018, eq. 3), with ``"llama"`` LLAMA (§4), with
``"laplace"`` and :class:`~numpyro_hbmeta.Newton` the classical Laplace empirical Bayes of a
hierarchical model. The optimiser moves in unconstrained space (no Jacobian term: the
maximiser of a likelihood does not depend on the parametrisation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from tqdm.auto import trange

from numpyro_hbmeta import linalg
from numpyro_hbmeta.curvature import hessian_blocks
from numpyro_hbmeta.data import take_tasks
from numpyro_hbmeta.handler import (
    OBJECTIVE_SITE,
    MetaMarginal,
    TaskContext,
    meta_marginal,
    trace_hidden,
)
from numpyro_hbmeta.implicit_prior import context_at, implicit_precision
from numpyro_hbmeta.inner import Newton, TruncatedGD
from numpyro_hbmeta.plate import is_task_frame, task_batch

__all__ = ["MetaEB", "MetaEBResult", "TaskGaussian"]


class MetaEBState(NamedTuple):
    params: dict[str, jnp.ndarray]  # unconstrained
    opt_state: Any


class MetaEBResult(NamedTuple):
    """Result of :meth:`MetaEB.run`.

    Attributes:
        params: constrained values of the global sites.
        losses: (num_steps,) negative objective at each step (before its update).
        state: final optimiser state (unconstrained params and optax state).
        inactive_sites: globals whose gradient was exactly zero at the first step: the objective
            does not depend on them (e.g. τ under ``maml``, where the implicit prior replaces
            p(φ | θ)); their values are the initial ones and carry no information.
        boundary_sites: positive globals (scales) whose estimate sits at the boundary 0: the
            objective does not get worse when the value is shrunk 1000-fold (e.g. τ̂ = 0 on
            eight schools). A warning names the remedies.
    """

    params: dict[str, jnp.ndarray]
    losses: jnp.ndarray
    state: MetaEBState
    inactive_sites: tuple[str, ...] = ()
    boundary_sites: tuple[str, ...] = ()


class TaskGaussian(dist.MultivariateNormal):
    """A per-task Gaussian over flat unconstrained task parameters, batch shape (tasks,),
    with :meth:`to_sites` mapping draws back to constrained site values."""

    def __init__(self, loc, *, precision_matrix, context: TaskContext) -> None:
        super().__init__(loc, precision_matrix=precision_matrix)
        self._context = context

    def to_sites(self, value: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """(..., tasks, d) -> {task site: constrained value (..., *site shape)}."""
        return self._context.constrained(value)


class MetaEB:
    """Empirical Bayes over the globals of a hierarchical model with marginalised tasks.

    Args:
        model: the NumPyro model (globals outside, task sites inside ``hbm.tasks``).
        inner: :class:`TruncatedGD` or :class:`Newton`.
        objective: ``"maml"``, ``"llama"`` or ``"laplace"``.
        curvature: ``"full"``, ``"diag"``, or for ``llama`` ``"kfac"``/``"ggn"`` (or a
            configured ``KFAC(...)``/``GGN(...)``), as in :func:`meta_marginal`.
        optimizer: an optax ``GradientTransformation`` (default ``optax.adam(1e-2)``); ones
            that need ``value``/``grad``/``value_fn`` (``optax.lbfgs``) are supported.
        eta: LLAMA's η.
        hyperprior: add log p(θ) (MAP-II) instead of pure type-II maximum likelihood.
    """

    def __init__(self, model: Callable, *, inner: TruncatedGD | Newton, objective: str,
                 curvature: str = "full", optimizer: optax.GradientTransformation | None = None,
                 eta: float = 1e-6, hyperprior: bool = False) -> None:
        self.model = model
        self.inner = inner
        self.marginal: MetaMarginal = meta_marginal(model, inner=inner, objective=objective,
                                                    curvature=curvature, eta=eta)
        self.optimizer = optax.with_extra_args_support(
            optax.adam(1e-2) if optimizer is None else optimizer)
        self.hyperprior = hyperprior
        # One compiled Laplace-Gaussian per driver: task_posterior, sample_posterior and
        # to_inference_data all call it, and a fresh jax.jit each call would recompile.
        self._laplace_gaussian_jit = jax.jit(self._laplace_gaussian)

    # -- the objective --------------------------------------------------------------------
    def _trace(self, unconstrained, support, query):
        def substitute_fn(msg):
            if msg["type"] == "sample" and msg["name"] in unconstrained:
                return biject_to(msg["fn"].support)(unconstrained[msg["name"]])
            return None

        with handlers.block(), handlers.trace() as tr, handlers.substitute(
                substitute_fn=substitute_fn):
            self.marginal(support, query)
        return tr

    def loss(self, unconstrained: Mapping[str, jnp.ndarray], support, query=None):
        """−Σ_j objective_j (scaled by the tasks plate), − log p(θ) if ``hyperprior``."""
        tr = self._trace(unconstrained, support, query)
        total = 0.0
        for site in tr.values():
            if site["type"] != "sample" or (not site["is_observed"] and not self.hyperprior):
                continue
            log_prob = jnp.sum(site["fn"].log_prob(site["value"]))
            total = total + (log_prob if site["scale"] is None else site["scale"] * log_prob)
        return -total

    # -- fitting --------------------------------------------------------------------------
    def init(self, rng_key, support, query=None, init_params=None) -> MetaEBState:
        """Unconstrained start: ``init_params`` (constrained) or uniform(−2, 2), as NumPyro's
        ``init_to_uniform``, and the optimiser state."""
        globals_ = self._global_sites(rng_key, support)
        init_params = dict(init_params or {})
        unknown = set(init_params) - set(globals_)
        if unknown:
            raise ValueError(f"init_params has {sorted(unknown)}, which are not global sites "
                             f"of the model (globals: {sorted(globals_)})")
        params = {}
        keys = jax.random.split(rng_key, max(len(globals_), 1))
        for key, (name, site) in zip(keys, globals_.items(), strict=False):
            transform = biject_to(site["fn"].support)
            if name in init_params:
                value = jnp.asarray(init_params[name], dtype=jnp.result_type(float))
                if value.shape != jnp.shape(site["value"]):
                    raise ValueError(f"init_params[{name!r}] has shape {value.shape}, the site "
                                     f"has shape {jnp.shape(site['value'])}")
                params[name] = transform.inv(value)
            else:
                shape = transform.inverse_shape(jnp.shape(site["value"]))
                params[name] = jax.random.uniform(key, shape, minval=-2.0, maxval=2.0)
        return MetaEBState(params, self.optimizer.init(params))

    def _step_fn(self, num_tasks: int, batch_size: int | None, plate_name: str):
        def batch_loss(params, support, query, indices):
            if indices is None:
                return self.loss(params, support, query)
            sliced = take_tasks(support, indices)
            sliced_query = None if query is None else take_tasks(query, indices)
            with task_batch(plate_name, num_tasks, indices):
                return self.loss(params, sliced, sliced_query)

        def step(state, rng_key, support, query):
            indices = None
            if batch_size is not None:
                indices = jax.random.choice(rng_key, num_tasks, (batch_size,), replace=False)
            value_fn = lambda p: batch_loss(p, support, query, indices)  # noqa: E731
            value, grads = jax.value_and_grad(value_fn)(state.params)
            updates, opt_state = self.optimizer.update(
                grads, state.opt_state, state.params, value=value, grad=grads,
                value_fn=value_fn)
            new_state = MetaEBState(optax.apply_updates(state.params, updates), opt_state)
            active = {name: jnp.any(g != 0) for name, g in grads.items()}
            return new_state, value, active

        return jax.jit(step)

    def run(self, rng_key, num_steps: int, support: Mapping[str, Any],
            query: Mapping[str, Any] | None = None, *, task_batch_size: int | None = None,
            progress_bar: bool = True, init_params: Mapping[str, Any] | None = None
            ) -> MetaEBResult:
        """Maximise the objective for ``num_steps`` optimiser steps.

        Raises:
            FloatingPointError: the objective became non-finite; the message names the step
                and the tasks whose inner solve diverged or whose curvature is not positive
                definite.
        """
        spec = self.marginal.check(support, query, rng_key=rng_key)
        num_tasks = spec.subsample_size
        if task_batch_size is not None and not 0 < task_batch_size <= num_tasks:
            raise ValueError(f"task_batch_size must be in 1..{num_tasks}, got {task_batch_size}")
        if task_batch_size is not None and spec.size != spec.subsample_size:
            raise ValueError("task_batch_size cannot be combined with a subsampled tasks plate")
        key_init, key_steps = jax.random.split(rng_key)
        state = self.init(key_init, support, query, init_params)
        step = self._step_fn(num_tasks, task_batch_size, spec.plate_name)
        keys = jax.random.split(key_steps, num_steps)
        losses = np.empty(num_steps)
        inactive: tuple[str, ...] = ()
        bar = trange(num_steps, disable=not progress_bar, desc=f"MetaEB {self.marginal.objective}")
        for i in bar:
            new_state, value, active = step(state, keys[i], support, query)
            losses[i] = float(value)
            if i == 0:
                inactive = tuple(name for name, flag in active.items() if not bool(flag))
            if not np.isfinite(losses[i]):
                raise FloatingPointError(self._failure_report(i, state.params, support, query))
            state = new_state
            if progress_bar and (i % 10 == 0 or i == num_steps - 1):
                bar.set_postfix(loss=f"{losses[i]:.4f}")
        params = self._constrained(state.params, support, query)
        boundary = tuple(n for n in self.boundary_sites(params, support, query)
                         if n not in inactive) if num_steps else ()
        if boundary:
            warnings.warn(
                f"MetaEB: the estimate of {', '.join(boundary)} is at its boundary 0 (the "
                "objective does not decrease when it is shrunk 1000-fold): empirical Bayes "
                "collapses the hierarchy there. Remedies: hyperprior=True (MAP-II) with a prior "
                "on the scale whose density vanishes at 0, e.g. Gamma(2, rate) (Chung et al. "
                "2013; a HalfNormal or HalfCauchy prior does not move the mode off 0), or "
                "full Bayes over the globals with NUTS on meta_marginal(...).", stacklevel=2)
        return MetaEBResult(params, jnp.asarray(losses), state, inactive, boundary)

    def boundary_sites(self, params: Mapping[str, Any], support, query=None
                       ) -> tuple[str, ...]:
        """Positive globals whose estimate is at the boundary 0 of their support.

        A scale s is at the boundary when loss(s/1000) ≤ loss(s) + 1e-6·(1 + |loss(s)|): the
        objective's supremum is then approached as s → 0, not attained inside the support.
        """
        sites = self._global_sites(jax.random.PRNGKey(0), support)
        positive = [n for n, site in sites.items()
                    if site["fn"].support in (constraints.positive, constraints.softplus_positive)
                    and n in params]
        if not positive:
            return ()

        @jax.jit
        def losses(constrained):
            unconstrained = {n: biject_to(sites[n]["fn"].support).inv(v)
                             for n, v in constrained.items()}
            return self.loss(unconstrained, support, query)

        base = float(losses(dict(params)))
        out = []
        for name in positive:
            shrunk = float(losses({**params, name: jnp.asarray(params[name]) * 1e-3}))
            if shrunk <= base + 1e-6 * (1 + abs(base)):
                out.append(name)
        return tuple(out)

    def _global_sites(self, rng_key, support, substitute_fn=None) -> dict[str, Any]:
        """Trace sites of the global latents of the user's model (tasks hidden, nothing
        solved): their supports, shapes and, with ``substitute_fn``, values."""
        with handlers.block(), handlers.seed(rng_seed=rng_key), handlers.substitute(
                substitute_fn=substitute_fn or (lambda msg: None)):
            context_trace = trace_hidden(self.model, support)
        return {n: s for n, s in context_trace.items()
                if s["type"] == "sample" and not s["is_observed"]
                and n in self._global_names(context_trace)}

    @staticmethod
    def _global_names(trace) -> set[str]:
        return {n for n, s in trace.items() if s["type"] == "sample" and not any(
            is_task_frame(f) for f in s.get("cond_indep_stack", ()))}

    def _constrained(self, params, support, query) -> dict[str, jnp.ndarray]:
        # Supports may depend on other globals, so constrain along a trace of the model.
        def substitute_fn(msg):
            if msg["type"] == "sample" and msg["name"] in params:
                return biject_to(msg["fn"].support)(params[msg["name"]])
            return None

        sites = self._global_sites(jax.random.PRNGKey(0), support, substitute_fn)
        return {name: sites[name]["value"] for name in params}

    def _failure_report(self, step: int, params, support, query) -> str:
        tr = self._trace(params, support, query)
        lines = [f"MetaEB: the objective is not finite at step {step}."]
        values = tr[OBJECTIVE_SITE]["fn"].log_prob(tr[OBJECTIVE_SITE]["value"]).reshape(-1)
        bad = np.nonzero(~np.isfinite(np.asarray(values)))[0]
        lines.append(f"non-finite task objective(s) at task index(es) {bad[:20].tolist()}")
        if "hbm_curvature_min_eigenvalue" in tr:
            eig = np.asarray(tr["hbm_curvature_min_eigenvalue"]["value"])
            not_pd = np.nonzero(~(eig > 0))[0]
            if not_pd.size:
                lines.append(f"curvature not positive definite for task(s) {not_pd[:20].tolist()}"
                             f" (smallest eigenvalues {eig[not_pd[:5]].round(6).tolist()}); "
                             "use a PSD curvature or a convex task loss")
        converged = np.asarray(tr["hbm_inner_converged"]["value"])
        if not converged.all():
            lines.append(f"inner solver did not converge / diverged for task(s) "
                         f"{np.nonzero(~converged)[0][:20].tolist()}; reduce step_size or "
                         "raise max_steps")
        constrained = {k: np.asarray(tr[k]["value"]).round(4).tolist() for k in params}
        lines.append(f"globals at that step: {constrained}")
        return "\n".join(lines)

    # -- task posteriors ------------------------------------------------------------------
    def task_posterior(self, params: Mapping[str, Any], support: Mapping[str, Any]
                       ) -> TaskGaussian:
        """The Laplace Gaussian of each task's flat unconstrained parameters at φ̂_j.

        Precision: the Hessian of the negative log joint at φ̂_j (explicit prior, Newton);
        under MAML's implicit prior, the implicit prior's precision plus the Hessian of the
        support negative log-likelihood at φ̂_j (Grant et al. 2018, §3.2 and §4).
        """
        context = context_at(self.model, params, support)
        phi_hat, precision = self._laplace_gaussian_jit(dict(params), support)
        # HVP-built Hessians are symmetric only up to roundoff.
        precision = 0.5 * (precision + jnp.swapaxes(precision, -1, -2))
        eig = np.asarray(linalg.eigvalsh(precision)[:, 0])
        if not (eig > 0).all():
            bad = np.nonzero(~(eig > 0))[0]
            raise FloatingPointError(
                f"task_posterior: the precision is not positive definite for task(s) "
                f"{bad[:20].tolist()} (smallest eigenvalues {eig[bad[:5]].tolist()}); "
                "the task posterior has no Laplace approximation there"
                + (". Under MAML's implicit prior a NaN means β·λ ≥ 1 for the support loss's "
                   "Hessian: the inner gradient descent does not contract, so no Gaussian "
                   "prior reproduces it; use a smaller step_size"
                   if self.inner.prior == "implicit" else ""))
        return TaskGaussian(phi_hat, precision_matrix=precision, context=context)

    def to_inference_data(self, result: MetaEBResult, support: Mapping[str, Any], *,
                          rng_key=None, num_samples: int = 1000, task_labels=None,
                          query: Mapping[str, Any] | None = None):
        """ArviZ ``InferenceData`` of a fit: the point-estimated globals (repeated, sd 0) and
        ``num_samples`` draws of every task site from :meth:`task_posterior`, with a ``tasks``
        dimension (see :func:`numpyro_hbmeta.to_inference_data`)."""
        from numpyro_hbmeta.inference_data import to_inference_data
        from numpyro_hbmeta.results import FitResult

        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        draws = self.sample_posterior(rng_key, result.params, support, num_samples)
        fit = FitResult(self.marginal.objective, self.model, dict(support),
                        {k: np.asarray(v)[None] for k, v in draws.items()},
                        point_sites=tuple(result.params),
                        info={"final_loss": float(result.losses[-1])} if len(result.losses)
                        else {}, approximate="point estimate of the globals (empirical Bayes)")
        return to_inference_data(fit, task_labels=task_labels, query=query)

    def _laplace_gaussian(self, params, support):
        context = context_at(self.model, params, support)
        phi_hat, _ = self.marginal.solve(context, support)
        density = context.log_density(self.model, support)
        if self.inner.prior == "implicit":
            prior_precision, _ = implicit_precision(self.model, context, support, self.inner)
            return phi_hat, prior_precision + hessian_blocks(lambda p: -density(p).log_lik,
                                                             phi_hat)
        return phi_hat, hessian_blocks(lambda p: -density(p).log_joint, phi_hat)

    def sample_posterior(self, rng_key, params: Mapping[str, Any], support: Mapping[str, Any],
                         num_samples: int) -> dict[str, jnp.ndarray]:
        """Draws of every task site (constrained) from :meth:`task_posterior`, plus the
        globals repeated, each with a leading (num_samples,) axis."""
        posterior = self.task_posterior(params, support)
        draws = posterior.to_sites(posterior.sample(rng_key, (num_samples,)))
        for name, value in params.items():
            value = jnp.asarray(value)
            draws[name] = jnp.broadcast_to(value, (num_samples, *value.shape))
        return draws

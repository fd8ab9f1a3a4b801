"""The Gaussian prior that truncated gradient descent implies (Santos 1996).

Grant et al. (ICLR 2018, §3.2, eq. 5-6): for a quadratic task loss with Hessian
H = O Λ Oᵀ, K steps of size β from θ end exactly at the MAP under the prior

    φ ~ N(θ, O diag(q) Oᵀ),  q_i = ((1 − β λ_i)^(−K) − 1) / λ_i,

(q_i → K β as λ_i → 0: directions the data do not constrain keep the prior width that K
steps of size β allow). For non-quadratic losses the statement is local: H is taken at the
starting point θ, so the prior is that of the linearised (quadratic) problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers

from numpyro_hbmeta import linalg
from numpyro_hbmeta.curvature import hessian_blocks
from numpyro_hbmeta.handler import TaskContext, trace_globals
from numpyro_hbmeta.inner import TruncatedGD

__all__ = ["implicit_prior", "implicit_prior_variances"]


def implicit_prior_variances(eigenvalues: jnp.ndarray, *, num_steps: int,
                             step_size: float) -> jnp.ndarray:
    """q_i = β f(βλ_i) with f(x) = ((1 − x)^(−K) − 1)/x, f(0) = K, stable near x = 0.

    Valid for βλ < 1 (gradient descent contracts along λ); NaN otherwise (GD then oscillates
    or diverges along that direction and no Gaussian prior reproduces it).
    """
    x = step_size * eigenvalues
    small = jnp.abs(x) < 1e-4
    safe = jnp.where(small, 1.0, x)
    f_exact = jnp.expm1(-num_steps * jnp.log1p(-jnp.where(small, 0.5, safe))) / safe
    k = num_steps
    f_series = k + k * (k + 1) / 2 * x + k * (k + 1) * (k + 2) / 6 * x**2
    f = jnp.where(small, f_series, f_exact)
    return jnp.where(x < 1, step_size * f, jnp.nan)


def _implicit_precision_and_cov(hessians, inner: TruncatedGD):
    eigenvalues, vectors = linalg.eigh(hessians)
    q = implicit_prior_variances(eigenvalues, num_steps=inner.num_steps,
                                 step_size=inner.step_size)
    cov = jnp.einsum("jik,jk,jlk->jil", vectors, q, vectors)
    precision = jnp.einsum("jik,jk,jlk->jil", vectors, 1.0 / q, vectors)
    return precision, cov, eigenvalues


def context_at(model: Callable, params: Mapping[str, Any], data: Mapping[str, Any]
               ) -> TaskContext:
    """Trace the model's globals at ``params`` (constrained) on ``data``, eagerly."""
    with handlers.block(), handlers.seed(rng_seed=0), handlers.substitute(data=dict(params)):
        context = trace_globals(model, data)
    missing = [name for name in context.spec.global_sites if name not in params]
    if missing:
        raise ValueError(f"params lacks the global site(s) {missing}; "
                         f"the model's globals are {list(context.spec.global_sites)}")
    return context


def implicit_precision(model: Callable, context: TaskContext, support: Mapping[str, Any],
                       inner: TruncatedGD) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Precision (tasks, d, d) and covariance of the implicit prior, linearised at φ⁰."""
    density = context.log_density(model, support)
    hessians = hessian_blocks(lambda p: -density(p).log_lik, context.phi0)
    precision, cov, eigenvalues = _implicit_precision_and_cov(hessians, inner)
    bad = ~(inner.step_size * eigenvalues < 1).all(-1)
    if not isinstance(bad, jax.core.Tracer) and bool(bad.any()):
        worst = float(jnp.max(inner.step_size * eigenvalues))
        raise FloatingPointError(
            f"implicit_prior: β·λ_max = {worst:.4g} ≥ 1 for task(s) "
            f"{jnp.nonzero(bad)[0][:10].tolist()}; gradient descent does not contract there "
            "and no Gaussian prior reproduces it. Use a smaller step_size.")
    return precision, cov


def implicit_prior(model: Callable, params: Mapping[str, Any], support: Mapping[str, Any],
                   inner: TruncatedGD) -> dist.MultivariateNormal:
    """The Gaussian prior over each task's flat unconstrained parameters that ``inner`` implies.

    Args:
        model: the hierarchical model.
        params: constrained values of its global sites.
        support: the support data (the task losses whose curvature defines the prior).
        inner: a :class:`TruncatedGD`.

    Returns:
        ``MultivariateNormal`` with batch shape (tasks,) and event shape (d,): mean φ⁰ = E[φ|θ],
        covariance O diag(q) Oᵀ from the support negative log-likelihood's Hessian at φ⁰.
    """
    if not isinstance(inner, TruncatedGD):
        raise TypeError(f"implicit_prior is defined for TruncatedGD, got {inner!r}")
    context = context_at(model, params, support)
    _, cov = implicit_precision(model, context, support, inner)
    return dist.MultivariateNormal(context.phi0, covariance_matrix=cov)

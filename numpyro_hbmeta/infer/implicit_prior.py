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
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints

from numpyro_hbmeta import validate
from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature import hessian_blocks
from numpyro_hbmeta.inner import TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import TaskContext, trace_globals

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
    return precision, cov, eigenvalues, q


def _step_size_error(bad: np.ndarray, eigenvalues: np.ndarray, inner: TruncatedGD,
                     detail: str, *, bound: str = "below") -> ValueError:
    """The error for tasks ``bad`` (tasks,) bool whose implicit prior does not exist."""
    tasks = np.flatnonzero(bad)
    listed = tasks[:10].tolist() + (["..."] if tasks.size > 10 else [])
    lambda_max = float(np.max(eigenvalues[tasks]))
    return ValueError(
        f"implicit_prior: step_size must be {bound} 1/λ_max = {1 / lambda_max:.6g} for "
        f"task(s) {listed} (step_size β = {inner.step_size:.6g}, largest β·λ = "
        f"{inner.step_size * lambda_max:.10g}); {detail} Use a smaller step_size "
        "(numpyro_hbmeta.inner.max_eigenvalue and stable_step_size give one).")


def _check_contracting(eigenvalues, inner: TruncatedGD) -> None:
    """Raise where β·λ ≥ 1 (concrete values only; a no-op under tracing)."""
    if isinstance(eigenvalues, jax.core.Tracer):
        return
    eigenvalues = np.asarray(eigenvalues)
    bad = ~np.all(inner.step_size * eigenvalues < 1, -1)
    if bad.any():
        raise _step_size_error(bad, eigenvalues, inner, (
            "along an eigenvector with β·λ ≥ 1 gradient descent does not contract "
            "monotonically (it oscillates, or diverges beyond 2), q = ((1 − βλ)^(−K) − 1)/λ "
            "is negative or undefined, and no Gaussian prior reproduces the K steps "
            "(Santos 1996; Grant et al., ICLR 2018, §3.2)."))


def _check_representable(eigenvalues, q, cov, inner: TruncatedGD) -> None:
    """Raise where the implied covariance is not a usable (positive-definite, finite)
    matrix in this dtype: β·λ just below 1 makes q ~ (1 − βλ)^(−K)/λ astronomically large
    next to the other directions' variances. Concrete values only; a no-op under tracing
    (``jax.jit(implicit_prior, ...)``), where the Cholesky's NaNs carry the failure."""
    if any(isinstance(a, jax.core.Tracer) for a in (eigenvalues, q, cov)):
        return
    eigenvalues, q, cov = (np.asarray(a) for a in (eigenvalues, q, cov))
    positive_definite = np.asarray(constraints.positive_definite.check(cov))
    chol = np.asarray(linalg.cholesky(cov))
    usable = (np.all(np.isfinite(q) & (q > 0), -1) & positive_definite
              & np.all(np.isfinite(chol), (-2, -1))
              & np.all(np.diagonal(chol, axis1=-2, axis2=-1) > 0, -1))
    if not usable.all():
        widest = float(np.max(np.where(np.isfinite(q), q, np.inf)[~usable]))
        raise _step_size_error(~usable, eigenvalues, inner, (
            f"β·λ is so close to 1 that the implied prior variance "
            f"((1 − βλ)^(−K) − 1)/λ reaches {widest:.3g} for K = {inner.num_steps}, and the "
            f"covariance O diag(q) Oᵀ is not positive definite in {cov.dtype} (the prior is "
            "flat along that eigenvector for all practical purposes)."), bound="well below")


def _implicit_pieces(model: Callable, context: TaskContext, support: Mapping[str, Any],
                     inner: TruncatedGD):
    density = context.log_density(model, support)
    hessians = hessian_blocks(lambda p: -density(p).log_lik, context.phi0)
    return _implicit_precision_and_cov(hessians, inner)


def context_at(model: Callable, params: Mapping[str, Any], data: Mapping[str, Any]
               ) -> TaskContext:
    """Trace the model's globals at ``params`` (constrained) on ``data``, eagerly."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of the global sites' constrained values, got "
                        f"{type(params).__name__}")
    params = {name: jnp.asarray(value) for name, value in params.items()}
    data = validate.task_data(data, "data")
    with handlers.block(), handlers.seed(rng_seed=0), handlers.substitute(data=dict(params)):
        context = trace_globals(model, data)
    missing = [name for name in context.spec.global_sites if name not in params]
    if missing:
        raise validate.InputError(f"params lacks the global site(s) {missing}; "
                         f"the model's globals are {list(context.spec.global_sites)}")
    return context


def implicit_precision(model: Callable, context: TaskContext, support: Mapping[str, Any],
                       inner: TruncatedGD) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Precision (tasks, d, d) and covariance of the implicit prior, linearised at φ⁰.

    Safe under ``jit``/``grad``: with traced values nothing is checked and a task with
    β·λ ≥ 1 has NaN entries; with concrete values it raises the ``ValueError`` of
    :func:`implicit_prior` for those tasks.
    """
    precision, cov, eigenvalues, _ = _implicit_pieces(model, context, support, inner)
    _check_contracting(eigenvalues, inner)
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

    Raises:
        ValueError: for some task β·λ_i ≥ 1 (no Gaussian prior reproduces K steps there), or
            β·λ_i is so close to 1 that the covariance is not positive definite in the
            working precision; the message names the tasks, the largest β·λ and the bound
            1/λ_max that ``step_size`` must stay below.
    """
    if not isinstance(inner, TruncatedGD):
        raise TypeError(f"implicit_prior is defined for TruncatedGD, got {inner!r}")
    context = context_at(model, params, support)
    _, cov, eigenvalues, q = _implicit_pieces(model, context, support, inner)
    _check_contracting(eigenvalues, inner)
    _check_representable(eigenvalues, q, cov, inner)
    return dist.MultivariateNormal(context.phi0, covariance_matrix=cov)

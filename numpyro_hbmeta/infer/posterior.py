r"""One Gaussian task posterior, N(φ̂_j, P_j⁻¹), whatever the curvature structure of P_j.

The Laplace approximation of task j's posterior over its flat unconstrained parameters is
N(φ̂_j, P_j⁻¹), P_j the curvature of the task's negative log posterior at φ̂_j (MacKay 1992;
Grant et al., ICLR 2018, §3.2 and §4). As in laplace-torch (Daxberger et al., NeurIPS 2021)
one object serves every structure of P_j, and its decomposition is computed once, when the
object is built; ``log_prob``, ``sample``, the dense matrices and the linearised predictive
only apply it. The structures (:mod:`numpyro_hbmeta.infer.precision`, each a pytree over
(tasks, ...) arrays):

* :class:`DensePrecision` — P_j dense, with its Cholesky factor L_j and L_j⁻¹;
* :class:`DiagPrecision` — P_j diagonal;
* :class:`KroneckerPrecision` — K-FAC, ⊕_l (U_A ⊗ U_G) diag(λ_l) (U_A ⊗ U_G)ᵀ per layer in
  the eigenbases of the factors (Martens & Grosse 2015; Ritter et al., ICLR 2018), with a
  permutation from Φ's columns to K-FAC's row-major vec (:mod:`numpyro_hbmeta.curvature.kronecker`);
* :class:`LowRankPrecision` — D^½ (I + V diag(m) Vᵀ) D^½ with V orthonormal (d, n): the GGN
  δI + JᵀΛJ with n < d observed values plus a diagonal prior, never a d × d matrix.

Every structure offers log det P, the quadratic form xᵀPx, P⁻¹v, and a square root S of the
covariance (S Sᵀ = P⁻¹), so that a draw is φ̂ + S z with z ~ N(0, I_d); :class:`TaskPosterior`
is the NumPyro distribution built on them. :func:`laplace_task_posterior` builds it from a
:func:`~numpyro_hbmeta.meta_marginal` with the curvature the marginal is configured with; its
docstring says what each curvature means under an explicit and under MAML's implicit prior.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from numpyro_hbmeta.curvature import (
    FullCurvature,
    KFACTaskCurvature,
    hessian_blocks,
)
from numpyro_hbmeta.curvature import diag as diagonal_curvature
from numpyro_hbmeta.infer.implicit_prior import (
    context_at,
    implicit_precision,
)
from numpyro_hbmeta.infer.precision import (
    DensePrecision,
    Precision,
    as_precision,
    implicit_structured,
    layer_prior,
)
from numpyro_hbmeta.marginal.meta_marginal import MetaMarginal, TaskContext

__all__ = ["LinearisedPredictive", "TaskPosterior", "laplace_task_posterior"]


# --------------------------------------------------------------------------- the distribution


class LinearisedPredictive(NamedTuple):
    """The GLM predictive of f(φ) under N(φ̂, P⁻¹): f(φ) ≈ f(φ̂) + J (φ − φ̂).

    Attributes:
        mean: f(φ̂), (tasks, *out).
        covariance: J P⁻¹ Jᵀ per task, (tasks, *out, *out).
        draws: f(φ̂) + J S z, (num_samples, tasks, *out) (empty without ``num_samples``).
    """

    mean: jnp.ndarray
    covariance: jnp.ndarray
    draws: jnp.ndarray


class TaskPosterior(dist.Distribution):
    r"""N(φ̂_j, P_j⁻¹) per task over the flat unconstrained task parameters, any structure.

    Batch shape (tasks,), event shape (d,), as the ``MultivariateNormal`` it replaces
    (``loc``, ``covariance_matrix``, ``precision_matrix`` are there, dense, for checking).
    A pytree: it passes through ``jax.jit``; nothing is decomposed again after construction.

    Args:
        loc: φ̂, (tasks, d).
        precision: a :class:`Precision` structure (its decomposition done).
        context: the :class:`~numpyro_hbmeta.marginal.meta_marginal.TaskContext` whose
            layout Φ follows, for :meth:`to_sites` (optional).

    Examples:
        >>> import jax.numpy as jnp
        >>> from numpyro_hbmeta.infer.precision import DiagPrecision
        >>> posterior = TaskPosterior(jnp.zeros((2, 3)), DiagPrecision(jnp.full((2, 3), 4.0)))
        >>> posterior.batch_shape, posterior.event_shape
        ((2,), (3,))
        >>> [round(float(v), 4) for v in posterior.variance[0]]
        [0.25, 0.25, 0.25]
    """

    support = constraints.real_vector
    reparametrized_params: ClassVar[list[str]] = ["loc"]
    pytree_data_fields = ("loc", "precision", "_context_arrays")
    pytree_aux_fields = ("_spec",)

    def __init__(self, loc: jnp.ndarray, precision: Precision, *,
                 context: TaskContext | None = None, validate_args: bool | None = None) -> None:
        loc = jnp.asarray(loc)
        if loc.ndim != 2:
            raise ValueError(f"TaskPosterior: expected loc (tasks, d), got {loc.shape}")
        self.loc, self.precision = loc, precision
        self._spec = None if context is None else context.spec
        self._context_arrays = None if context is None else tuple(context)[1:]
        super().__init__(batch_shape=loc.shape[:1], event_shape=loc.shape[1:],
                         validate_args=validate_args)

    # -- moments and densities -------------------------------------------------------------
    @property
    def mean(self) -> jnp.ndarray:
        return self.loc

    @property
    def variance(self) -> jnp.ndarray:
        return jnp.diagonal(self.covariance(), axis1=-2, axis2=-1)

    def covariance(self) -> jnp.ndarray:
        """P_j⁻¹, (tasks, d, d), from the kept decomposition (S Sᵀ)."""
        root = self._scale_matrix()
        return root @ jnp.swapaxes(root, -1, -2)

    def precision_dense(self) -> jnp.ndarray:
        """P_j, (tasks, d, d)."""
        return self.precision.dense()

    @property
    def covariance_matrix(self) -> jnp.ndarray:
        return self.covariance()

    @property
    def precision_matrix(self) -> jnp.ndarray:
        return self.precision_dense()

    def _scale_matrix(self) -> jnp.ndarray:
        num_tasks, d = self.loc.shape
        basis = np.broadcast_to(np.eye(d)[:, None, :], (d, num_tasks, d)).astype(self.loc.dtype)
        return jnp.transpose(self.precision.scale(basis), (1, 2, 0))  # [t, :, k] = S_t e_k

    def log_prob(self, value: jnp.ndarray) -> jnp.ndarray:
        """log N(value | φ̂_j, P_j⁻¹) for value (..., tasks, d), shape (..., tasks)."""
        d = self.event_shape[0]
        quadratic = self.precision.quadratic(value - self.loc)
        return -0.5 * (quadratic + d * math.log(2 * math.pi) - self.precision.logdet())

    def entropy(self) -> jnp.ndarray:
        d = self.event_shape[0]
        return 0.5 * (d * (1.0 + math.log(2 * math.pi)) - self.precision.logdet())

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jnp.ndarray:
        """φ̂ + S z, z ~ N(0, I) of shape (*sample_shape, tasks, d), S Sᵀ = P⁻¹."""
        z = jax.random.normal(key, tuple(sample_shape) + self.loc.shape, self.loc.dtype)
        return self.loc + self.precision.scale(z)

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jnp.ndarray:
        return self.sample(key, sample_shape)

    # -- constrained values and predictions ------------------------------------------------
    @property
    def context(self) -> TaskContext | None:
        if self._spec is None:
            return None
        return TaskContext(self._spec, *self._context_arrays)

    def to_sites(self, value: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """(..., tasks, d) -> {task site: constrained value (..., *site shape)}."""
        context = self.context
        if context is None:
            raise ValueError("TaskPosterior.to_sites needs the TaskContext of the model; "
                             "build the posterior with context=... (laplace_task_posterior "
                             "does)")
        return context.constrained(value)

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue of each P_j (tasks,) (a bound for :class:`LowRankPrecision`)."""
        return self.precision.min_eigenvalue()

    def linearised_predictive(self, fn: Callable[[jnp.ndarray], jnp.ndarray], *,
                              rng_key: jax.Array | None = None,
                              num_samples: int = 0) -> LinearisedPredictive:
        r"""The linearised (GLM) predictive of ``fn`` (Immer et al., AISTATS 2021, §3):

            f(φ_j) ≈ f(φ̂_j) + J_j (φ_j − φ̂_j)  ~  N(f(φ̂_j), J_j P_j⁻¹ J_jᵀ),

        J_j = ∂f/∂φ at φ̂_j. With m outputs per task and d parameters, the covariance takes
        m vector-Jacobian products and m solves (m ≤ d), or d Jacobian-vector products of the
        columns of S (m > d); draws f(φ̂) + J S z take one JVP each. J is never formed
        across tasks.

        Args:
            fn: Φ (tasks, d) -> (tasks, *out), acting task-wise (output j depends on φ_j
                alone), e.g. the network's output at query inputs.
            rng_key: key of the draws.
            num_samples: number of function draws.
        """
        mean, pullback = jax.vjp(fn, self.loc)
        num_tasks, out = mean.shape[0], mean.shape[1:]
        m, d = math.prod(out), self.event_shape[0]
        if m <= d:
            basis = np.broadcast_to(np.eye(m, dtype=mean.dtype).reshape(m, 1, *out),
                                    (m, num_tasks, *out))
            (rows,) = jax.vmap(pullback)(basis)  # [k, t] = J_t,k
            solved = jax.vmap(self.precision.solve)(rows)
            covariance = jnp.einsum("ktd,ltd->tkl", rows, solved)
        else:
            root = jnp.moveaxis(self._scale_matrix(), -1, 0)  # [k, t] = S_t e_k
            pushed = jax.vmap(lambda v: jax.jvp(fn, (self.loc,), (v,))[1])(root)
            pushed = pushed.reshape(d, num_tasks, m)
            covariance = jnp.einsum("ktm,ktn->tmn", pushed, pushed)
        covariance = 0.5 * (covariance + jnp.swapaxes(covariance, -1, -2))
        covariance = covariance.reshape(num_tasks, *out, *out)
        draws = jnp.zeros((0, *mean.shape), mean.dtype)
        if num_samples:
            rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
            z = jax.random.normal(rng_key, (num_samples, *self.loc.shape), self.loc.dtype)
            shifts = self.precision.scale(z)
            draws = mean + jax.vmap(lambda v: jax.jvp(fn, (self.loc,), (v,))[1])(shifts)
        return LinearisedPredictive(mean, covariance, draws)


def _diagonal_prior(neg_log_prior: Callable, phi: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """π = diag ∇²(−log p(φ | θ)) at φ (d batched HVPs) and the off-diagonal residual
    |Hr − π⊙r| / max|π| for a fixed Rademacher probe r (zero iff H is diagonal, almost
    surely), both per task."""
    prior = diagonal_curvature(neg_log_prior, phi).diagonal
    probe = jax.random.rademacher(jax.random.PRNGKey(0), phi.shape, phi.dtype)
    _, hvp = jax.jvp(jax.grad(lambda p: jnp.sum(neg_log_prior(p))), (phi,), (probe,))
    residual = jnp.max(jnp.abs(hvp - prior * probe), -1) / jnp.max(jnp.abs(prior), -1)
    return prior, residual


class _Checks(NamedTuple):
    prior_off_diagonal: jnp.ndarray  # (tasks,)
    prior_spread: jnp.ndarray  # (tasks,)
    positive_definite: Any = None  # (tasks,) bool, filled in by _laplace_precision


@functools.partial(jax.jit, static_argnums=0)
def _laplace_precision(marginal: MetaMarginal, params, support
                       ) -> tuple[jnp.ndarray, Precision, _Checks]:
    phi_hat, precision, checks = _build_precision(marginal, params, support)
    return phi_hat, precision, checks._replace(
        positive_definite=precision.is_positive_definite())


def _build_precision(marginal: MetaMarginal, params, support
                     ) -> tuple[jnp.ndarray, Precision, _Checks]:
    context = context_at(marginal.model, params, support)
    phi_hat, _ = marginal.solve(context, support)
    density = context.log_density(marginal.model, support)
    observations = context.observations(marginal.model, support)
    implicit = marginal.inner.prior == "implicit"
    likelihood_only = getattr(marginal.build, "likelihood_only", False)
    zeros = jnp.zeros(phi_hat.shape[:1], phi_hat.dtype)
    if implicit or likelihood_only:
        loss = lambda p: -density(p).log_lik  # noqa: E731
    else:
        loss = lambda p: -density(p).log_joint  # noqa: E731
    curvature = marginal.build(loss, phi_hat, observations)
    if implicit:
        if isinstance(curvature, FullCurvature):
            prior, _ = implicit_precision(marginal.model, context, support, marginal.inner)
            return phi_hat, DensePrecision.from_matrix(prior + curvature.matrix), \
                _Checks(zeros, zeros)
        return phi_hat, implicit_structured(curvature, marginal.inner), _Checks(zeros, zeros)
    if not likelihood_only:  # the curvature of the log joint: the precision as it is
        return phi_hat, as_precision(curvature), _Checks(zeros, zeros)
    neg_log_prior = lambda p: -density(p).log_prior  # noqa: E731
    if isinstance(curvature, FullCurvature):
        return phi_hat, DensePrecision.from_matrix(
            curvature.matrix + hessian_blocks(neg_log_prior, phi_hat)), _Checks(zeros, zeros)
    prior, off_diagonal = _diagonal_prior(neg_log_prior, phi_hat)
    spread = (layer_prior(curvature, prior)[1] if isinstance(curvature, KFACTaskCurvature)
              else zeros)
    return phi_hat, as_precision(curvature, prior), _Checks(off_diagonal, spread)


def _tolerance(dtype) -> float:
    return 1e3 * float(jnp.finfo(dtype).eps)


def _check(marginal: MetaMarginal, precision: Precision, checks: _Checks, dtype) -> None:
    curvature = marginal.curvature
    off = np.asarray(checks.prior_off_diagonal)
    if (off > _tolerance(dtype)).any():
        bad = np.nonzero(off > _tolerance(dtype))[0]
        raise ValueError(
            f"laplace_task_posterior: curvature={curvature!r} approximates the likelihood "
            f"only, and the prior's Hessian is not diagonal for task(s) {bad[:20].tolist()} "
            f"(relative off-diagonal part {off[bad[:5]].tolist()}), so it cannot be folded "
            "into that structure; use curvature='full'")
    spread = np.asarray(checks.prior_spread)
    if (spread > _tolerance(dtype)).any():
        bad = np.nonzero(spread > _tolerance(dtype))[0]
        raise ValueError(
            f"laplace_task_posterior: curvature={curvature!r}: the prior precision differs "
            f"within a K-FAC layer for task(s) {bad[:20].tolist()} (relative spread "
            f"{spread[bad[:5]].tolist()}); A ⊗ G + D keeps the Kronecker eigenbasis only for "
            "a D that is constant on each layer (an isotropic prior per layer). Use "
            "curvature='ggn' (any diagonal prior) or 'full'")
    ok = np.asarray(checks.positive_definite)
    if not ok.all():
        bad = np.nonzero(~ok)[0]
        eig = np.asarray(precision.min_eigenvalue())[bad[:5]]
        hint = ""
        if marginal.inner.prior == "implicit":
            hint = (". Under MAML's implicit prior a NaN means β·λ ≥ 1 for the support loss's "
                    "curvature: the inner gradient descent does not contract, so no Gaussian "
                    "prior reproduces it; use a smaller step_size")
        raise FloatingPointError(
            f"laplace_task_posterior: the precision is not positive definite for task(s) "
            f"{bad[:20].tolist()} (smallest eigenvalues {eig.tolist()}); the task posterior "
            f"has no Laplace approximation there{hint}")


def laplace_task_posterior(marginal: MetaMarginal, params: Mapping[str, Any],
                           support: Mapping[str, Any]) -> TaskPosterior:
    r"""The Laplace task posterior N(φ̂_j, P_j⁻¹) with the marginal's own curvature.

    φ̂_j = ``marginal.inner``(θ, support_j); P_j is built by ``marginal.build`` on the support
    data and keeps its structure:

    ============  ==========================================  ==============================
    curvature     explicit prior (``Newton``, MAP-GD)         implicit prior (MAML's GD)
    ============  ==========================================  ==============================
    ``full``      ∇²(−log joint) at φ̂ (dense)                Q(H(φ⁰)) + H(φ̂), dense: the
                                                              implicit prior's precision
                                                              (:mod:`implicit_prior`) plus
                                                              the support NLL Hessian
    ``diag``      diag ∇²(−log joint) at φ̂                   g(h) entrywise, h = diag H(φ̂)
    ``kfac``      A_l ⊗ G_l + δI + π_l I per layer            g(a_i g_j + δ) in the
                  (π_l: the prior precision, which must be    Kronecker eigenbasis
                  constant within each layer)
    ``ggn``       δI + JᵀΛJ + diag(π) (low rank + diagonal    g(δI + JᵀΛJ): g(δ) off J's row
                  when n < d, else dense)                     space, g(δ + s²) on it
    ============  ==========================================  ==============================

    with g = :func:`implicit_posterior_precision`, g(λ) = λ / (1 − (1 − βλ)^K). Under the
    implicit prior a structured curvature C is read as the Hessian of a quadratic task loss:
    K steps of GD on it imply the prior Q(C) (Santos 1996) and Q(C) + C = g(C) is a spectral
    function of C, so the posterior keeps C's structure and its eigenbasis. Exact when the
    support loss is quadratic with Hessian C; ``full`` takes the prior's Hessian at φ⁰ and
    the likelihood's at φ̂ (as :func:`~numpyro_hbmeta.infer.implicit_prior` does), which agree for
    a quadratic loss. A structured C's damping δ stays part of C; the implicit prior already
    gives directions the data do not constrain the precision g(δ) ≈ 1/(Kβ), so keep δ small.

    Under an explicit prior, ``kfac``/``ggn`` (and other likelihood-only builders such as a
    diagonal GGN) approximate the likelihood only; the prior precision π = diag ∇²(−log
    p(φ | θ)) at φ̂ is added exactly (computed by d Hessian-vector products and checked to be
    diagonal, e.g. φ_j ~ N(θ, τ²I)); a non-diagonal prior, or for K-FAC one not constant
    within a layer, is refused with the reason.

    Args:
        marginal: a :func:`~numpyro_hbmeta.meta_marginal` (its inner solver and curvature).
        params: constrained values of the global sites.
        support: the support data (all of a task's data for the Laplace evidence).

    Returns:
        A :class:`TaskPosterior` with batch shape (tasks,) and event shape (d,).

    Raises:
        FloatingPointError: P_j is not positive definite for some task (named, with its
            smallest eigenvalue); never silently repaired.
        ValueError: a prior that cannot be folded into the structure.
    """
    context = context_at(marginal.model, params, support)
    phi_hat, precision, checks = _laplace_precision(marginal, dict(params), dict(support))
    _check(marginal, precision, checks, phi_hat.dtype)
    return TaskPosterior(phi_hat, precision, context=context)

r"""One Gaussian task posterior, N(φ̂_j, P_j⁻¹), whatever the curvature structure of P_j.

The Laplace approximation of task j's posterior over its flat unconstrained parameters is
N(φ̂_j, P_j⁻¹), P_j the curvature of the task's negative log posterior at φ̂_j (MacKay 1992;
Grant et al., ICLR 2018, §3.2 and §4). As in laplace-torch (Daxberger et al., NeurIPS 2021)
one object serves every structure of P_j, and its decomposition is computed once, when the
object is built; ``log_prob``, ``sample``, the dense matrices and the linearised predictive
only apply it. The structures (each a pytree over (tasks, ...) arrays):

* :class:`DensePrecision` — P_j dense, with its Cholesky factor L_j and L_j⁻¹;
* :class:`DiagPrecision` — P_j diagonal;
* :class:`KroneckerPrecision` — K-FAC, ⊕_l (U_A ⊗ U_G) diag(λ_l) (U_A ⊗ U_G)ᵀ per layer in
  the eigenbases of the factors (Martens & Grosse 2015; Ritter et al., ICLR 2018), with a
  permutation from Φ's columns to K-FAC's row-major vec (:mod:`numpyro_hbmeta.kfac`);
* :class:`LowRankPrecision` — D^½ (I + V diag(m) Vᵀ) D^½ with V orthonormal (d, n): the GGN
  δI + JᵀΛJ with n < d observed values plus a diagonal prior, never a d × d matrix.

Every structure offers log det P, the quadratic form xᵀPx, P⁻¹v, and a square root S of the
covariance (S Sᵀ = P⁻¹), so that a draw is φ̂ + S z with z ~ N(0, I_d); :class:`TaskPosterior`
is the NumPyro distribution built on them. :func:`laplace_task_posterior` builds it from a
:func:`~numpyro_hbmeta.meta_marginal` with the curvature the marginal is configured with; its
docstring says what each curvature means under an explicit and under MAML's implicit prior.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from numpyro_hbmeta import linalg
from numpyro_hbmeta.curvature import (
    DiagCurvature,
    FullCurvature,
    GGNCurvature,
    KFACTaskCurvature,
    hessian_blocks,
)
from numpyro_hbmeta.curvature import diag as diagonal_curvature
from numpyro_hbmeta.handler import MetaMarginal, TaskContext
from numpyro_hbmeta.implicit_prior import context_at, implicit_precision, implicit_prior_variances
from numpyro_hbmeta.inner import TruncatedGD

__all__ = [
    "DensePrecision",
    "DiagPrecision",
    "KroneckerPrecision",
    "LinearisedPredictive",
    "LowRankPrecision",
    "Precision",
    "TaskPosterior",
    "as_precision",
    "implicit_posterior_precision",
    "laplace_task_posterior",
]

_ROUNDOFF = 10.0


class Precision(Protocol):
    """What :class:`TaskPosterior` needs of a structured precision P_j, batched over tasks.

    Vectors are (..., tasks, d) in Φ's layout; every method broadcasts over the leading axes.
    """

    def logdet(self) -> jnp.ndarray: ...  # (tasks,)

    def quadratic(self, x: jnp.ndarray) -> jnp.ndarray: ...  # xᵀ P x, (..., tasks)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray: ...  # P⁻¹ v

    def scale(self, z: jnp.ndarray) -> jnp.ndarray: ...  # S z, S Sᵀ = P⁻¹

    def dense(self) -> jnp.ndarray: ...  # (tasks, d, d)

    def is_positive_definite(self) -> jnp.ndarray: ...  # (tasks,) bool

    def min_eigenvalue(self) -> jnp.ndarray: ...  # (tasks,), diagnostic


def _pytree(*, data: tuple[str, ...], meta: tuple[str, ...] = ()) -> Callable:
    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data),
                                                meta_fields=list(meta))
    return register


# --------------------------------------------------------------------------- structures


@_pytree(data=("matrix", "cholesky", "inverse_cholesky"))
class DensePrecision:
    """Dense P_j = L_j L_jᵀ, (tasks, d, d); S = L⁻ᵀ (the sampler of
    :class:`~numpyro_hbmeta.curvature.FullCurvature`). Build with :meth:`from_matrix`."""

    matrix: jnp.ndarray
    cholesky: jnp.ndarray
    inverse_cholesky: jnp.ndarray

    @classmethod
    def from_matrix(cls, matrix: jnp.ndarray) -> DensePrecision:
        """Symmetrise (HVP-built blocks are symmetric only up to roundoff) and factor once."""
        matrix = 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))
        chol = linalg.cholesky(matrix)  # NaN where P_j is not positive definite
        return cls(matrix, chol, linalg.triangular_inverse(chol))

    def _diagonal(self) -> jnp.ndarray:
        return jnp.diagonal(self.cholesky, axis1=-2, axis2=-1)

    def logdet(self) -> jnp.ndarray:
        return 2.0 * jnp.sum(jnp.log(self._diagonal()), -1)

    def quadratic(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.sum(jnp.einsum("tik,...ti->...tk", self.cholesky, x) ** 2, -1)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        w = jnp.einsum("tki,...ti->...tk", self.inverse_cholesky, v)
        return jnp.einsum("tki,...tk->...ti", self.inverse_cholesky, w)

    def scale(self, z: jnp.ndarray) -> jnp.ndarray:
        return jnp.einsum("tki,...tk->...ti", self.inverse_cholesky, z)

    def dense(self) -> jnp.ndarray:
        return self.matrix

    def is_positive_definite(self) -> jnp.ndarray:
        diagonal = self._diagonal()
        return jnp.all(jnp.isfinite(diagonal) & (diagonal > 0), -1)

    def min_eigenvalue(self) -> jnp.ndarray:
        return linalg.eigvalsh(jax.lax.stop_gradient(self.matrix))[..., 0]


@_pytree(data=("diagonal",))
class DiagPrecision:
    """Diagonal P_j, (tasks, d); S = P^(−½)."""

    diagonal: jnp.ndarray

    def logdet(self) -> jnp.ndarray:
        return jnp.sum(jnp.log(self.diagonal), -1)

    def quadratic(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.sum(self.diagonal * x**2, -1)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return v / self.diagonal

    def scale(self, z: jnp.ndarray) -> jnp.ndarray:
        return z / jnp.sqrt(self.diagonal)

    def dense(self) -> jnp.ndarray:
        return jax.vmap(jnp.diag)(self.diagonal)

    def is_positive_definite(self) -> jnp.ndarray:
        return jnp.all(self.diagonal > 0, -1)  # False for NaN

    def min_eigenvalue(self) -> jnp.ndarray:
        return jnp.min(jax.lax.stop_gradient(self.diagonal), -1)


@_pytree(data=("bases_a", "bases_g", "eigenvalues"), meta=("order",))
class KroneckerPrecision:
    r"""Block-diagonal P_j = ⊕_l (U_A ⊗ U_G) diag(vec λ_l) (U_A ⊗ U_G)ᵀ in K-FAC's layout.

    λ_l (tasks, p, q) are P's own eigenvalues in the Kronecker eigenbasis of layer l, e.g.
    a_i g_j + δ + π for K-FAC plus an isotropic prior, or a spectral function of them
    (:func:`implicit_posterior_precision`); every operation is O(pq(p + q)) per layer and
    task. S is the symmetric root P^(−½).

    Attributes:
        bases_a: U_A per layer, (tasks, p, p).
        bases_g: U_G per layer, (tasks, q, q).
        eigenvalues: λ per layer, (tasks, p, q), row-major like vec(W̄).
        order: (static) the column of Φ at each position of the concatenated K-FAC vec.
    """

    bases_a: tuple[jnp.ndarray, ...]
    bases_g: tuple[jnp.ndarray, ...]
    eigenvalues: tuple[jnp.ndarray, ...]
    order: tuple[int, ...]

    def _split(self, v: jnp.ndarray) -> list[jnp.ndarray]:
        u = v[..., np.asarray(self.order)]
        shapes = [lam.shape[-2:] for lam in self.eigenvalues]
        cuts = np.cumsum([p * q for p, q in shapes])[:-1].tolist()
        return [part.reshape((*part.shape[:-1], *shape))
                for part, shape in zip(jnp.split(u, cuts, axis=-1), shapes, strict=True)]

    def _join(self, blocks: list[jnp.ndarray]) -> jnp.ndarray:
        u = jnp.concatenate([b.reshape((*b.shape[:-2], -1)) for b in blocks], -1)
        return u[..., np.argsort(self.order)]

    def _map(self, fn: Callable, v: jnp.ndarray) -> jnp.ndarray:
        """v -> ⊕_l (U_A ⊗ U_G) diag(fn(λ_l)) (U_A ⊗ U_G)ᵀ v."""
        out = []
        for u_a, u_g, lam, x in zip(self.bases_a, self.bases_g, self.eigenvalues,
                                    self._split(v), strict=True):
            rotated = jnp.swapaxes(u_a, -1, -2) @ x @ u_g
            out.append(u_a @ (fn(lam) * rotated) @ jnp.swapaxes(u_g, -1, -2))
        return self._join(out)

    def logdet(self) -> jnp.ndarray:
        return sum(jnp.sum(jnp.log(lam), (-2, -1)) for lam in self.eigenvalues)

    def quadratic(self, x: jnp.ndarray) -> jnp.ndarray:
        total = 0.0
        for u_a, u_g, lam, block in zip(self.bases_a, self.bases_g, self.eigenvalues,
                                        self._split(x), strict=True):
            rotated = jnp.swapaxes(u_a, -1, -2) @ block @ u_g
            total = total + jnp.sum(lam * rotated**2, (-2, -1))
        return total

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return self._map(lambda lam: 1.0 / lam, v)

    def scale(self, z: jnp.ndarray) -> jnp.ndarray:
        return self._map(lambda lam: 1.0 / jnp.sqrt(lam), z)

    def dense(self) -> jnp.ndarray:
        d = len(self.order)
        num_tasks = self.eigenvalues[0].shape[0]
        basis = np.broadcast_to(np.eye(d)[:, None, :], (d, num_tasks, d))
        columns = self._map(lambda lam: lam, basis.astype(self.eigenvalues[0].dtype))
        return jnp.transpose(columns, (1, 2, 0))

    def is_positive_definite(self) -> jnp.ndarray:
        return jnp.all(jnp.stack([jnp.all(lam > 0, (-2, -1)) for lam in self.eigenvalues]), 0)

    def min_eigenvalue(self) -> jnp.ndarray:
        return jnp.min(jnp.stack([jnp.min(jax.lax.stop_gradient(lam), (-2, -1))
                                  for lam in self.eigenvalues]), 0)


@_pytree(data=("diagonal", "basis", "boost"))
class LowRankPrecision:
    r"""P_j = D^½ (I + V diag(m) Vᵀ) D^½: a positive diagonal D (tasks, d), V (tasks, d, k)
    with orthonormal (or zero) columns, m (tasks, k) > −1.

    The GGN plus a diagonal prior, D + WᵀW with W = Λ^½J (tasks, n, d), is this form with
    W̃ = W D^(−½) = U diag(s) Vᵀ, m = s² (from the n × n eigh of W̃W̃ᵀ): with n < d every
    operation is O(nd) per task after that eigh (Sylvester, Woodbury):

        log det P = Σ log D + Σ log(1 + m),     xᵀPx = |y|² + Σ_k m_k (v_kᵀy)², y = D^½x,
        P⁻¹ = D^(−½)(I + V diag(1/(1+m) − 1) Vᵀ)D^(−½),   S = D^(−½)(I + V diag((1+m)^(−½) − 1) Vᵀ).
    """

    diagonal: jnp.ndarray
    basis: jnp.ndarray
    boost: jnp.ndarray

    def _inner(self, y: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
        """(I + V diag(weights) Vᵀ) y."""
        coefficients = jnp.einsum("tdk,...td->...tk", self.basis, y)
        return y + jnp.einsum("tdk,...tk->...td", self.basis, weights * coefficients)

    def logdet(self) -> jnp.ndarray:
        return jnp.sum(jnp.log(self.diagonal), -1) + jnp.sum(jnp.log1p(self.boost), -1)

    def quadratic(self, x: jnp.ndarray) -> jnp.ndarray:
        y = jnp.sqrt(self.diagonal) * x
        coefficients = jnp.einsum("tdk,...td->...tk", self.basis, y)
        return jnp.sum(y**2, -1) + jnp.sum(self.boost * coefficients**2, -1)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        root = jnp.sqrt(self.diagonal)
        return self._inner(v / root, 1.0 / (1.0 + self.boost) - 1.0) / root

    def scale(self, z: jnp.ndarray) -> jnp.ndarray:
        return self._inner(z, jax.lax.rsqrt(1.0 + self.boost) - 1.0) / jnp.sqrt(self.diagonal)

    def dense(self) -> jnp.ndarray:
        root = jnp.sqrt(self.diagonal)
        d = self.diagonal.shape[-1]
        inner = np.eye(d) + jnp.einsum("tik,tk,tjk->tij", self.basis, self.boost, self.basis)
        return root[..., :, None] * inner * root[..., None, :]

    def is_positive_definite(self) -> jnp.ndarray:
        return jnp.all(self.diagonal > 0, -1) & jnp.all(self.boost > -1.0, -1)

    def min_eigenvalue(self) -> jnp.ndarray:
        """min D · min(1, 1 + min m): exact for an isotropic D (with k < d), otherwise a
        lower bound of the right sign (Ostrowski's theorem)."""
        diagonal, boost = jax.lax.stop_gradient((self.diagonal, self.boost))
        return jnp.min(diagonal, -1) * jnp.minimum(1.0, 1.0 + jnp.min(boost, -1))


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
        context: the :class:`~numpyro_hbmeta.handler.TaskContext` whose layout Φ follows,
            for :meth:`to_sites` (optional).

    Examples:
        >>> import jax.numpy as jnp
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


# --------------------------------------------------------------------------- spectral maps


def implicit_posterior_precision(eigenvalues: jnp.ndarray, inner: TruncatedGD) -> jnp.ndarray:
    r"""The posterior precision that K steps of size β imply along a curvature eigenvalue λ.

    For a quadratic task loss with Hessian C = O diag(λ) Oᵀ, MAML's implicit prior has
    precision O diag(1/q) Oᵀ (Santos 1996; Grant et al., ICLR 2018, eq. 5-6), so the
    posterior precision is a spectral function of C alone,

        1/q(λ) + λ = λ / (1 − (1 − βλ)^K)   (→ 1/(Kβ) as λ → 0),

    with C's eigenvectors. NaN where βλ ≥ 1 (GD does not contract; no Gaussian prior).
    """
    q = implicit_prior_variances(eigenvalues, num_steps=inner.num_steps,
                                 step_size=inner.step_size)
    return 1.0 / q + eigenvalues


def _spectral_dense(matrix: jnp.ndarray, fn: Callable) -> DensePrecision:
    """O diag(fn(λ)) Oᵀ for the symmetric ``matrix`` = O diag(λ) Oᵀ."""
    values, vectors = linalg.eigh(matrix)
    return DensePrecision.from_matrix(jnp.einsum("tik,tk,tjk->tij", vectors, fn(values),
                                                 vectors))


def _gram_basis(w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """For W (tasks, n, d), n < d: s² (tasks, n), V (tasks, d, n) with W = U diag(s) Vᵀ, and a
    mask of the columns with s² above roundoff (V there is WᵀU/s; zero elsewhere)."""
    values, vectors = linalg.eigh(w @ jnp.swapaxes(w, -1, -2))
    scale = jnp.max(jnp.abs(values), -1, keepdims=True)
    tol = _ROUNDOFF * w.shape[-2] * jnp.finfo(values.dtype).eps * scale
    kept = values > tol
    inverse_s = jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, values, 1.0)), 0.0)
    basis = jnp.einsum("tnd,tnk->tdk", w, vectors) * inverse_s[..., None, :]
    return jnp.where(kept, values, 0.0), basis, kept


def _ggn_plus_diagonal(curvature: GGNCurvature, prior: jnp.ndarray) -> Precision:
    """(δ + π) + WᵀW with a diagonal prior precision π (tasks, d): exact."""
    w = curvature.jacobian
    diagonal = prior + jnp.asarray(curvature.damping, w.dtype)
    n, d = w.shape[-2:]
    if n >= d:
        return DensePrecision.from_matrix(jax.vmap(jnp.diag)(prior) + curvature.dense())
    s2, basis, _ = _gram_basis(w / jnp.sqrt(diagonal)[..., None, :])
    return LowRankPrecision(diagonal, basis, s2)


def _ggn_implicit(curvature: GGNCurvature, inner: TruncatedGD) -> Precision:
    """g(δI + WᵀW) with g = :func:`implicit_posterior_precision`: g(δ) on the complement
    of W's row space, g(δ + s²) on it."""
    w = curvature.jacobian
    num_tasks, n, d = w.shape
    g = functools.partial(implicit_posterior_precision, inner=inner)
    if n >= d:
        return _spectral_dense(curvature.dense(), g)
    s2, basis, kept = _gram_basis(w)
    damping = jnp.full((num_tasks, 1), curvature.damping, w.dtype)
    outside = g(damping)
    boost = jnp.where(kept, g(damping + s2) / outside - 1.0, 0.0)
    return LowRankPrecision(jnp.broadcast_to(outside, (num_tasks, d)), basis, boost)


def _kfac_precision(curvature: KFACTaskCurvature, fn: Callable[[int, jnp.ndarray],
                                                                 jnp.ndarray]
                    ) -> KroneckerPrecision:
    """Each layer's A ⊗ G + δI in its eigenbasis, eigenvalues mapped by fn(layer, λ)."""
    bases_a, bases_g, eigenvalues = [], [], []
    for index, layer in enumerate(curvature.layers):
        spec = layer.factor().spectrum()
        lam = spec.a[..., :, None] * spec.g[..., None, :] + curvature.damping
        bases_a.append(spec.u_a)
        bases_g.append(spec.u_g)
        eigenvalues.append(fn(index, lam) * spec.nan_mask[..., None, None])
    return KroneckerPrecision(tuple(bases_a), tuple(bases_g), tuple(eigenvalues),
                              tuple(int(i) for i in np.asarray(curvature.order)))


def _layer_prior(curvature: KFACTaskCurvature, prior: jnp.ndarray
                 ) -> tuple[list[jnp.ndarray], jnp.ndarray]:
    """The prior precision of each K-FAC layer (its mean, (tasks,)) and how far π departs
    from constant within a layer (tasks,), relative to its largest entry."""
    order = np.asarray(curvature.order)
    start, means, spread = 0, [], jnp.zeros(prior.shape[:1], prior.dtype)
    for layer in curvature.layers:
        size = layer.inputs.shape[-1] * layer.output_grads.shape[-1]
        block = prior[:, order[start:start + size]]
        start += size
        means.append(jnp.mean(block, -1))
        gap = jnp.max(jnp.abs(block - means[-1][:, None]), -1)
        largest = jnp.max(jnp.abs(prior), -1)
        spread = jnp.maximum(spread, jnp.where(largest > 0, gap / largest, 0.0))
    return means, spread


# --------------------------------------------------------------------------- the builder


def _implicit_structured(curvature: Any, inner: TruncatedGD) -> Precision:
    g = functools.partial(implicit_posterior_precision, inner=inner)
    if isinstance(curvature, DiagCurvature):
        return DiagPrecision(g(curvature.diagonal))
    if isinstance(curvature, GGNCurvature):
        return _ggn_implicit(curvature, inner)
    if isinstance(curvature, KFACTaskCurvature):
        return _kfac_precision(curvature, lambda _, lam: g(lam))
    raise _unsupported(curvature)


def as_precision(curvature: Any, prior_precision: jnp.ndarray | None = None) -> Precision:
    """A curvature object as a decomposed :class:`Precision`, plus a diagonal prior precision.

    ``FullCurvature`` → dense, ``DiagCurvature`` → diagonal, ``GGNCurvature`` → low rank plus
    diagonal (n < d) or dense, ``KFACTaskCurvature`` → Kronecker (the curvature's damping
    kept). ``prior_precision`` π (tasks, d) is added exactly; for K-FAC it must be constant
    within each layer (its per-layer mean is used; :func:`laplace_task_posterior` checks).
    For callers that use a curvature as the whole precision, as LLAMA's predictive does with
    F + δI (δ the isotropic prior): ``TaskPosterior(phi_hat, as_precision(curvature))``.
    """
    if isinstance(curvature, FullCurvature):
        matrix = curvature.matrix
        if prior_precision is not None:
            matrix = matrix + jax.vmap(jnp.diag)(prior_precision)
        return DensePrecision.from_matrix(matrix)
    if prior_precision is None:
        prior_precision = jnp.zeros(_curvature_shape(curvature), _curvature_dtype(curvature))
    if isinstance(curvature, DiagCurvature):
        return DiagPrecision(curvature.diagonal + prior_precision)
    if isinstance(curvature, GGNCurvature):
        return _ggn_plus_diagonal(curvature, prior_precision)
    if isinstance(curvature, KFACTaskCurvature):
        means, _ = _layer_prior(curvature, prior_precision)
        return _kfac_precision(curvature, lambda index, lam: lam + means[index][:, None, None])
    raise _unsupported(curvature)


def _curvature_shape(curvature: Any) -> tuple[int, int]:
    if isinstance(curvature, DiagCurvature):
        return curvature.diagonal.shape
    if isinstance(curvature, GGNCurvature):
        return curvature.jacobian.shape[0], curvature.jacobian.shape[-1]
    if isinstance(curvature, KFACTaskCurvature):
        return curvature.layers[0].inputs.shape[0], len(curvature.order)
    raise _unsupported(curvature)


def _curvature_dtype(curvature: Any):
    leaves = [leaf for leaf in jax.tree.leaves(curvature) if hasattr(leaf, "dtype")
              and jnp.issubdtype(leaf.dtype, jnp.floating)]
    return leaves[0].dtype


def _unsupported(curvature: Any) -> TypeError:
    return TypeError(f"laplace_task_posterior: no posterior structure for a "
                     f"{type(curvature).__name__} curvature; expected FullCurvature, "
                     "DiagCurvature, GGNCurvature or KFACTaskCurvature")


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
        return phi_hat, _implicit_structured(curvature, marginal.inner), _Checks(zeros, zeros)
    if not likelihood_only:  # the curvature of the log joint: the precision as it is
        return phi_hat, as_precision(curvature), _Checks(zeros, zeros)
    neg_log_prior = lambda p: -density(p).log_prior  # noqa: E731
    if isinstance(curvature, FullCurvature):
        return phi_hat, DensePrecision.from_matrix(
            curvature.matrix + hessian_blocks(neg_log_prior, phi_hat)), _Checks(zeros, zeros)
    prior, off_diagonal = _diagonal_prior(neg_log_prior, phi_hat)
    spread = (_layer_prior(curvature, prior)[1] if isinstance(curvature, KFACTaskCurvature)
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
    the likelihood's at φ̂ (as :func:`~numpyro_hbmeta.implicit_prior` does), which agree for
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

r"""The precision P_j of a Gaussian task posterior, in every curvature structure, decomposed once.

Every structure offers log det P, the quadratic form xᵀPx, P⁻¹v, and a square root S of the
covariance (S Sᵀ = P⁻¹), so that a draw is φ̂ + S z with z ~ N(0, I_d) (each a pytree over
(tasks, ...) arrays; laplace-torch's one-posterior-many-structures design, Daxberger et al.,
NeurIPS 2021):

* :class:`DensePrecision` — P_j dense, with its Cholesky factor L_j and L_j⁻¹;
* :class:`DiagPrecision` — P_j diagonal;
* :class:`KroneckerPrecision` — K-FAC, ⊕_l (U_A ⊗ U_G) diag(λ_l) (U_A ⊗ U_G)ᵀ per layer in
  the eigenbases of the factors (Martens & Grosse 2015; Ritter et al., ICLR 2018), with a
  permutation from Φ's columns to K-FAC's row-major vec
  (:mod:`numpyro_hbmeta.curvature.kronecker`);
* :class:`LowRankPrecision` — D^½ (I + V diag(m) Vᵀ) D^½ with V orthonormal (d, n): the GGN
  δI + JᵀΛJ with n < d observed values plus a diagonal prior, never a d × d matrix.

:func:`as_precision` turns a curvature (:mod:`numpyro_hbmeta.curvature`) plus a diagonal prior
precision into one of them; :func:`implicit_structured` does the same under MAML's implicit
prior, whose posterior precision is a spectral function of the curvature
(:func:`implicit_posterior_precision`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature import (
    DiagCurvature,
    FullCurvature,
    GGNCurvature,
    KFACTaskCurvature,
)
from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.infer.implicit_prior import implicit_prior_variances
from numpyro_hbmeta.inner import TruncatedGD

__all__ = [
    "DensePrecision",
    "DiagPrecision",
    "KroneckerPrecision",
    "LowRankPrecision",
    "Precision",
    "as_precision",
    "implicit_posterior_precision",
    "implicit_structured",
    "layer_prior",
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


def layer_prior(curvature: KFACTaskCurvature, prior: jnp.ndarray
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


def implicit_structured(curvature: Any, inner: TruncatedGD) -> Precision:
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
        means, _ = layer_prior(curvature, prior_precision)
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



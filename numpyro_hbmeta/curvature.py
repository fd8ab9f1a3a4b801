"""Per-task curvature of a loss at the task parameters, and its log det, solve and sample.

For a per-task loss ℓ(Φ) = (ℓ_1(φ_1), ..., ℓ_J(φ_J)) with Φ of shape (tasks, d), the Hessian of
Σ_j ℓ_j is block diagonal, so d batched Hessian-vector products (one per basis vector, applied
to all tasks at once) give every task's d×d block; a (tasks·d)×(tasks·d) matrix is never
formed. The Laplace evidence (Grant et al., ICLR 2018, eq. 4; MacKay 1992) and LLAMA's
penalty η·log det Ĥ_j (ibid. §4) only need ``logdet``; the Laplace task posterior needs
``solve`` and ``sample``.

A curvature that is not positive definite is never replaced: ``logdet`` returns NaN for that
task (so an objective built on it is non-finite and drivers stop and report it) and
``min_eigenvalue`` says which tasks and by how much.

Builders (:data:`CURVATURES`) are called as ``build(loss, phi, observations)``: ``"full"`` and
``"diag"`` differentiate ``loss``; the Fisher-type ``"kfac"`` and ``"ggn"`` ignore it and read
the model's observation sites through ``observations`` (a
:class:`~numpyro_hbmeta.fisher.TaskObservations` on the data the loss is computed on). They
approximate the curvature of a negative *log-likelihood*, so they serve LLAMA's penalty
η·log det Ĥ_j (the paper's use, Grant et al., ICLR 2018, §4), not the Laplace evidence, which
needs the curvature of the log joint (``likelihood_only``). Their damping δ is a fixed part of
the curvature, independent of η: Ĥ_j = F_j + δI, which keeps log det finite when a task has
fewer points than parameters (F_j singular). Configure it with ``KFAC(damping=...)`` or
``GGN(damping=...)`` passed as ``curvature=``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta import linalg
from numpyro_hbmeta.kfac import KFACCurvature, KroneckerFactor, kron_min_eigenvalue
from numpyro_hbmeta.kfac import logdet as kfac_logdet

__all__ = [
    "CURVATURES",
    "GGN",
    "KFAC",
    "DiagCurvature",
    "FullCurvature",
    "GGNCurvature",
    "KFACTaskCurvature",
    "LayerPoints",
    "PermutedCurvature",
    "curvature_builder",
    "diag",
    "full",
    "hessian_blocks",
    "jacobian_blocks",
    "linear_blocks",
]

TaskLoss = Callable[[jnp.ndarray], jnp.ndarray]


def linear_blocks(linear: Callable[[jnp.ndarray], jnp.ndarray], num_tasks: int, dim: int,
                  dtype) -> jnp.ndarray:
    """The (tasks, d, d) blocks of a block-diagonal linear map on (tasks, d) arrays.

    Applies the map to the d basis vectors broadcast over all tasks: column k of every
    block in one call, so the cost is d applications, never a (tasks·d)² matrix.
    """
    # NumPy constants are embedded in the trace; jnp ones would compile eagerly per shape.
    basis = np.broadcast_to(np.eye(dim, dtype=dtype)[:, None, :], (dim, num_tasks, dim))
    columns = jax.vmap(linear)(basis)  # [k, j, :] = M_j e_k
    return jnp.transpose(columns, (1, 2, 0))


def jacobian_blocks(fn: Callable[[jnp.ndarray], jnp.ndarray], phi: jnp.ndarray) -> jnp.ndarray:
    """Per-task Jacobians (tasks, d, d) of a map (tasks, d) -> (tasks, d) that acts task-wise."""
    _, linear = jax.linearize(fn, phi)
    return linear_blocks(linear, *phi.shape, phi.dtype)


def hessian_blocks(loss: TaskLoss, phi: jnp.ndarray) -> jnp.ndarray:
    """Per-task Hessians (tasks, d, d) of ``loss`` (tasks, d) -> (tasks,), by d batched HVPs.

    Requires that ℓ_j depend on φ_j alone (checked by the handler at trace time).
    """
    return jacobian_blocks(jax.grad(lambda p: jnp.sum(loss(p))), phi)


class FullCurvature(NamedTuple):
    """Dense per-task curvature C_j, shape (tasks, d, d)."""

    matrix: jnp.ndarray

    def _cholesky(self) -> jnp.ndarray:
        return linalg.cholesky(self.matrix)  # NaN where C_j is not positive definite

    def _inverse_cholesky(self) -> jnp.ndarray:
        return linalg.triangular_inverse(self._cholesky())  # L⁻¹, C⁻¹ = L⁻ᵀ L⁻¹

    def logdet(self) -> jnp.ndarray:
        """log det C_j, (tasks,); NaN where C_j is not positive definite."""
        chol = self._cholesky()
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        """C_j⁻¹ v_j for v of shape (tasks, d)."""
        inv = self._inverse_cholesky()
        return jnp.einsum("...ki,...kl,...l->...i", inv, inv, v)

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        """Draws from N(0, C_j⁻¹), shape (num_samples, tasks, d)."""
        inv = self._inverse_cholesky()
        z = jax.random.normal(rng_key, (num_samples, *self.matrix.shape[:-1]), inv.dtype)
        # C = L Lᵀ, so x = L⁻ᵀ z has covariance L⁻ᵀ L⁻¹ = C⁻¹.
        return jnp.einsum("...ki,s...k->s...i", inv, z)

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue per task (diagnostic; no gradient flows through it)."""
        return linalg.eigvalsh(jax.lax.stop_gradient(self.matrix))[..., 0]

    def dense(self) -> jnp.ndarray:
        return self.matrix


class DiagCurvature(NamedTuple):
    """Diagonal per-task curvature, shape (tasks, d)."""

    diagonal: jnp.ndarray

    def logdet(self) -> jnp.ndarray:
        """Σ_i log c_ji, (tasks,); NaN where an entry is not positive."""
        positive = self.diagonal > 0
        logs = jnp.log(jnp.where(positive, self.diagonal, 1.0))
        return jnp.where(jnp.all(positive, -1), jnp.sum(logs, -1), jnp.nan)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return v / self.diagonal

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        z = jax.random.normal(rng_key, (num_samples, *self.diagonal.shape), self.diagonal.dtype)
        return z / jnp.sqrt(self.diagonal)

    def min_eigenvalue(self) -> jnp.ndarray:
        return jnp.min(jax.lax.stop_gradient(self.diagonal), -1)

    def dense(self) -> jnp.ndarray:
        return jax.vmap(jnp.diag)(self.diagonal)


def full(loss: TaskLoss, phi: jnp.ndarray, observations: Any = None) -> FullCurvature:
    """The exact per-task Hessian of ``loss`` at ``phi`` (``observations`` unused)."""
    return FullCurvature(hessian_blocks(loss, phi))


def diag(loss: TaskLoss, phi: jnp.ndarray, observations: Any = None) -> DiagCurvature:
    """The exact diagonal of the per-task Hessian (d batched HVPs; memory (tasks, d))."""
    _, hvp = jax.linearize(jax.grad(lambda p: jnp.sum(loss(p))), phi)
    num_tasks, dim = phi.shape

    def entry(k):
        e = jax.nn.one_hot(jnp.broadcast_to(k, (num_tasks,)), dim, dtype=phi.dtype)
        return hvp(e)[:, k]

    return DiagCurvature(jnp.transpose(jax.lax.map(entry, np.arange(dim))))


class GGNCurvature(NamedTuple):
    r"""The damped Gauss–Newton/Fisher matrix δI_d + WᵀW per task, W = Λ^½ J of shape
    (tasks, n, d) (n observed values, d parameters), never formed when n < d.

    With few points per task the n×n dual gives everything exactly (DESIGN.md):

        log det(δI_d + WᵀW) = (d − n) log δ + log det(δI_n + W Wᵀ)           (Sylvester)
        (δI_d + WᵀW)⁻¹ v = (v − Wᵀ (δI_n + W Wᵀ)⁻¹ W v) / δ                  (Woodbury)

    at O(n²d + n³) per task instead of O(d³). With n ≥ d the primal d×d matrix is used.

    Attributes:
        jacobian: W = Λ^½ J, (tasks, n, d).
        damping: δ ≥ 0 (must be positive when n < d, or the matrix is singular).
    """

    jacobian: jnp.ndarray
    damping: Any = 0.0

    @property
    def _dual(self) -> bool:
        n, d = self.jacobian.shape[-2:]
        return n < d

    def _gram(self) -> jnp.ndarray:
        w = self.jacobian
        m = w @ jnp.swapaxes(w, -1, -2) if self._dual else jnp.swapaxes(w, -1, -2) @ w
        eye = np.eye(m.shape[-1], dtype=m.dtype)
        return m + jnp.asarray(self.damping, m.dtype) * eye

    def logdet(self) -> jnp.ndarray:
        """log det(δI_d + WᵀW), (tasks,); NaN where it is not positive definite."""
        n, d = self.jacobian.shape[-2:]
        value = FullCurvature(self._gram()).logdet()
        if self._dual:
            value = value + (d - n) * jnp.log(jnp.asarray(self.damping, value.dtype))
        return value

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        """(δI_d + WᵀW)⁻¹ v_j for v of shape (tasks, d)."""
        inner = FullCurvature(self._gram())
        if not self._dual:
            return inner.solve(v)
        w = self.jacobian
        wv = jnp.einsum("...nd,...d->...n", w, v)
        correction = jnp.einsum("...nd,...n->...d", w, inner.solve(wv))
        return (v - correction) / self.damping

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        """Draws from N(0, (δI + WᵀW)⁻¹), (num_samples, tasks, d).

        x = M⁻¹(√δ z₁ + Wᵀ z₂), z ~ N(0, I), has covariance M⁻¹ (δI + WᵀW) M⁻¹ = M⁻¹, so only
        solves are needed, whatever n and d.
        """
        w = self.jacobian
        num_tasks, n, d = w.shape
        key_d, key_n = jax.random.split(rng_key)
        z_d = jax.random.normal(key_d, (num_samples, num_tasks, d), w.dtype)
        z_n = jax.random.normal(key_n, (num_samples, num_tasks, n), w.dtype)
        rhs = jnp.sqrt(self.damping) * z_d + jnp.einsum("jnd,sjn->sjd", w, z_n)
        return jax.vmap(self.solve)(rhs)

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue per task (δ when n < d); a diagnostic, no gradient."""
        if self._dual:
            num_tasks = self.jacobian.shape[0]
            return jnp.full((num_tasks,), self.damping, self.jacobian.dtype)
        return FullCurvature(jax.lax.stop_gradient(self._gram())).min_eigenvalue()

    def dense(self) -> jnp.ndarray:
        """δI_d + WᵀW, (tasks, d, d); for tests and small checks."""
        w = self.jacobian
        eye = np.eye(w.shape[-1], dtype=w.dtype)
        return jnp.swapaxes(w, -1, -2) @ w + self.damping * eye


class PermutedCurvature(NamedTuple):
    """A curvature that acts on the parameters in another order (K-FAC's layer-wise vec).

    Attributes:
        curvature: acts on u with u[i] = v[order[i]], v in the layout of Φ.
        order: (d,) integer array, a permutation of the columns of Φ.
    """

    curvature: Any
    order: np.ndarray

    @property
    def _inverse(self) -> np.ndarray:
        return np.argsort(self.order)

    def logdet(self) -> jnp.ndarray:
        return self.curvature.logdet()

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return self.curvature.solve(v[..., self.order])[..., self._inverse]

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        return self.curvature.sample(rng_key, num_samples)[..., self._inverse]

    def min_eigenvalue(self) -> jnp.ndarray:
        return self.curvature.min_eigenvalue()

    def dense(self) -> jnp.ndarray:
        inverse = self._inverse
        return self.curvature.dense()[..., inverse, :][..., :, inverse]


class LayerPoints(NamedTuple):
    """One dense layer's K-FAC statistics, point by point (:mod:`numpyro_hbmeta.kfac`).

    Attributes:
        inputs: ā, the layer inputs with the bias entry appended, restricted to the rows of
            W̄ = [W; b] that are task parameters, (tasks, n, p).
        output_grads: g, per-point gradients of the sampled-target loss w.r.t. the layer's
            pre-activation, (tasks, n, q).
    """

    inputs: jnp.ndarray
    output_grads: jnp.ndarray

    def factor(self) -> KroneckerFactor:
        """A = (1/n) Σ ā āᵀ (p × p), G = Σ g gᵀ (q × q), as :func:`kfac.dense_factors`."""
        a, g = self.inputs, self.output_grads
        return KroneckerFactor(jnp.einsum("tni,tnj->tij", a, a) / a.shape[-2],
                               jnp.einsum("tni,tnj->tij", g, g))

    def compact_factor(self) -> KroneckerFactor:
        """Factors with the same non-zero spectra, each of size min(n, p) and min(n, q).

        A = ĀᵀĀ/n and Ā Āᵀ/n share their non-zero eigenvalues (likewise G), so with fewer
        points than inputs the n × n Gram matrices carry the whole log det at a fraction of
        the cost of p × p eigendecompositions.
        """
        a, g = self.inputs, self.output_grads
        n, p, q = a.shape[-2], a.shape[-1], g.shape[-1]
        full = self.factor()
        A = jnp.einsum("tni,tmi->tnm", a, a) / n if n < p else full.A
        G = jnp.einsum("tni,tmi->tnm", g, g) if n < q else full.G
        return KroneckerFactor(A, G)


class KFACTaskCurvature(NamedTuple):
    """K-FAC per task, ⊕_l (A_l ⊗ G_l + δI), on Φ's layout.

    ``logdet`` and ``min_eigenvalue`` work on the compact factors
    (:meth:`LayerPoints.compact_factor`): every eigenvalue of A_l ⊗ G_l missing from them is
    zero, so log det = Σ_l [log det(Ã_l ⊗ G̃_l + δI) + (p_l q_l − p̃_l q̃_l) log δ]. ``solve``,
    ``sample`` and ``dense`` use the full factors (:class:`kfac.KFACCurvature`).

    Attributes:
        layers: one :class:`LayerPoints` per layer, in K-FAC order.
        order: (d,) the column of Φ at each position of the concatenated K-FAC vec.
        damping: δ.
    """

    layers: tuple[LayerPoints, ...]
    order: np.ndarray
    damping: Any = 0.0

    def _full(self) -> PermutedCurvature:
        factors = tuple(layer.factor() for layer in self.layers)
        return PermutedCurvature(KFACCurvature(factors, self.damping), self.order)

    def _missing(self, layer: LayerPoints, compact: KroneckerFactor) -> int:
        p, q = layer.inputs.shape[-1], layer.output_grads.shape[-1]
        return p * q - compact.A.shape[-1] * compact.G.shape[-1]

    def logdet(self) -> jnp.ndarray:
        """Σ_l log det(A_l ⊗ G_l + δI), (tasks,); NaN where a factor is not PSD."""
        total = 0.0
        for layer in self.layers:
            compact = layer.compact_factor()
            total = total + kfac_logdet(compact, self.damping)
            missing = self._missing(layer, compact)
            if missing:
                total = total + missing * jnp.log(jnp.asarray(self.damping,
                                                              compact.A.dtype))
        return total

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue per task, δ plus the smallest product a_i g_j (zero when a
        factor is rank deficient); a diagnostic, no gradient."""
        lowest = []
        for layer in self.layers:
            compact = jax.lax.stop_gradient(layer.compact_factor())
            low = kron_min_eigenvalue(compact)
            lowest.append(jnp.minimum(low, 0.0) if self._missing(layer, compact) else low)
        return jnp.min(jnp.stack(lowest), 0) + self.damping

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return self._full().solve(v)

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        return self._full().sample(rng_key, num_samples)

    def dense(self) -> jnp.ndarray:
        return self._full().dense()


class Observations(Protocol):
    """What the Fisher-type builders read (:class:`numpyro_hbmeta.fisher.TaskObservations`)."""

    def whitened_jacobian(self, phi: jnp.ndarray) -> jnp.ndarray: ...

    def kfac_statistics(self, phi: jnp.ndarray, rng_key: jax.Array
                        ) -> tuple[tuple[LayerPoints, ...], np.ndarray]: ...


def _check_damping(name: str, damping: float) -> None:
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{name}: damping must be a finite number ≥ 0, got {damping!r}")


def _need_observations(name: str, observations: Observations | None) -> Observations:
    if observations is None:
        raise ValueError(f"curvature={name!r} reads the model's observation sites: call it "
                         "as build(loss, phi, observations) (meta_marginal does)")
    return observations


@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC Fisher of the task negative log-likelihood, ⊕_l (A_l ⊗ G_l + δI), in Φ's layout.

    One Kronecker block per :func:`~numpyro_hbmeta.layers.dense_layer` whose weights are
    task parameters (Martens & Grosse 2015, §3; the curvature of LLAMA, Grant et al., ICLR
    2018, §4); every task parameter must be in exactly one such layer. Output gradients are
    taken at targets sampled from the model's predictive with a fixed key (``seed``) folded
    with the task index, so the objective is a deterministic function of the globals; for
    a Normal likelihood with one output per point, G is the exact expectation
    (:mod:`numpyro_hbmeta.fisher`).

    Args:
        damping: δ added to every block, independent of η.
        seed: the fixed PRNG seed of the sampled targets.
    """

    damping: float = 1e-3
    seed: int = 0
    likelihood_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_damping("KFAC", self.damping)

    def __call__(self, loss: TaskLoss, phi: jnp.ndarray,
                 observations: Observations | None = None) -> KFACTaskCurvature:
        observations = _need_observations("kfac", observations)
        layers, order = observations.kfac_statistics(phi, jax.random.PRNGKey(self.seed))
        return KFACTaskCurvature(layers, order, self.damping)


@dataclasses.dataclass(frozen=True)
class GGN:
    """The exact Gauss–Newton/Fisher of the task negative log-likelihood, δI + JᵀΛJ.

    J is the Jacobian of the observed sites' outputs (Normal means, Bernoulli logits) w.r.t.
    φ_j and Λ their output Fisher (1/σ² for a Normal, p(1 − p) for a Bernoulli), from n
    batched vector-Jacobian products; log det via the n×n dual when n < d
    (:class:`GGNCurvature`). Needs no declared layers.

    Args:
        damping: δ, independent of η; must be positive when a task has fewer observed values
            than parameters.
    """

    damping: float = 1e-3
    likelihood_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_damping("GGN", self.damping)

    def __call__(self, loss: TaskLoss, phi: jnp.ndarray,
                 observations: Observations | None = None) -> GGNCurvature:
        jacobian = _need_observations("ggn", observations).whitened_jacobian(phi)
        n, d = jacobian.shape[-2:]
        if n < d and self.damping == 0:
            raise ValueError(f"curvature='ggn' with {n} observed values per task and {d} "
                             "parameters is singular without damping; use GGN(damping=δ > 0)")
        return GGNCurvature(jacobian, self.damping)


CurvatureBuilder = Callable[..., Any]

CURVATURES: dict[str, CurvatureBuilder] = {
    "full": full,
    "diag": diag,
    "kfac": KFAC(),
    "ggn": GGN(),
}


def curvature_builder(curvature: str | CurvatureBuilder) -> CurvatureBuilder:
    """The builder for ``curvature``: a name in :data:`CURVATURES` or a configured builder
    such as ``KFAC(damping=1e-2)``."""
    if isinstance(curvature, str):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {tuple(CURVATURES)} or a builder such "
                             f"as KFAC(damping=...), got {curvature!r}")
        return CURVATURES[curvature]
    if not callable(curvature):
        raise ValueError(f"curvature must be one of {tuple(CURVATURES)} or a builder such as "
                         f"KFAC(damping=...), got {curvature!r}")
    return curvature

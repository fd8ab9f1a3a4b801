r"""The damped Gauss–Newton/Fisher δI + JᵀΛJ per task, with the n×n dual when n < d.

J is the Jacobian of the observed sites' outputs (Normal means, Bernoulli logits) w.r.t. φ_j
and Λ their output Fisher. Like K-FAC it approximates the curvature of a negative
*log-likelihood*, so it serves LLAMA's penalty η·log det Ĥ_j (Grant et al., ICLR 2018, §4),
not the Laplace evidence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature.base import Observations, TaskLoss, check_damping, need_observations
from numpyro_hbmeta.curvature.full import FullCurvature

__all__ = ["GGN", "GGNCurvature"]


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
        check_damping("GGN", self.damping)

    def __call__(self, loss: TaskLoss, phi: jnp.ndarray,
                 observations: Observations | None = None) -> GGNCurvature:
        jacobian = need_observations("ggn", observations).whitened_jacobian(phi)
        n, d = jacobian.shape[-2:]
        if n < d and self.damping == 0:
            raise ValueError(f"curvature='ggn' with {n} observed values per task and {d} "
                             "parameters is singular without damping; use GGN(damping=δ > 0)")
        return GGNCurvature(jacobian, self.damping)



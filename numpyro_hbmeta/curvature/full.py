"""The exact per-task Hessian C_j (tasks, d, d), by Cholesky: the Laplace evidence's curvature.

The Laplace evidence (Grant et al., ICLR 2018, eq. 4; MacKay 1992) needs log det C_j; the
Laplace task posterior needs solves and draws from N(0, C_j⁻¹). A block that is not positive
definite is never replaced: its log det is NaN and ``min_eigenvalue`` says by how much.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature.base import TaskLoss, hessian_blocks

__all__ = ["FullCurvature", "full"]


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



def full(loss: TaskLoss, phi: jnp.ndarray, observations: Any = None) -> FullCurvature:
    """The exact per-task Hessian of ``loss`` at ``phi`` (``observations`` unused)."""
    return FullCurvature(hessian_blocks(loss, phi))


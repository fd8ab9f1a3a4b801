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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

__all__ = [
    "CURVATURES",
    "DiagCurvature",
    "FullCurvature",
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
        return jnp.linalg.cholesky(self.matrix)  # NaN where C_j is not positive definite

    def logdet(self) -> jnp.ndarray:
        """log det C_j, (tasks,); NaN where C_j is not positive definite."""
        chol = self._cholesky()
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        """C_j⁻¹ v_j for v of shape (tasks, d)."""
        return jax.scipy.linalg.cho_solve((self._cholesky(), True), v[..., None])[..., 0]

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        """Draws from N(0, C_j⁻¹), shape (num_samples, tasks, d)."""
        chol = self._cholesky()
        z = jax.random.normal(rng_key, (num_samples, *self.matrix.shape[:-1]), chol.dtype)
        # C = L Lᵀ, so x = L⁻ᵀ z has covariance L⁻ᵀ L⁻¹ = C⁻¹.
        lt = jnp.swapaxes(chol, -1, -2)
        return jax.vmap(lambda zi: solve_triangular(lt, zi[..., None], lower=False)[..., 0])(z)

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue per task (diagnostic; no gradient flows through it)."""
        return jnp.linalg.eigvalsh(jax.lax.stop_gradient(self.matrix))[..., 0]

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


def full(loss: TaskLoss, phi: jnp.ndarray) -> FullCurvature:
    """The exact per-task Hessian of ``loss`` at ``phi``."""
    return FullCurvature(hessian_blocks(loss, phi))


def diag(loss: TaskLoss, phi: jnp.ndarray) -> DiagCurvature:
    """The exact diagonal of the per-task Hessian (d batched HVPs; memory (tasks, d))."""
    _, hvp = jax.linearize(jax.grad(lambda p: jnp.sum(loss(p))), phi)
    num_tasks, dim = phi.shape

    def entry(k):
        e = jax.nn.one_hot(jnp.broadcast_to(k, (num_tasks,)), dim, dtype=phi.dtype)
        return hvp(e)[:, k]

    return DiagCurvature(jnp.transpose(jax.lax.map(entry, np.arange(dim))))


CURVATURES: dict[str, Callable[[TaskLoss, jnp.ndarray], FullCurvature | DiagCurvature]] = {
    "full": full,
    "diag": diag,
}

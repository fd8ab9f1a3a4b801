"""The diagonal of the per-task Hessian (tasks, d), from d batched Hessian-vector products."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature.base import TaskLoss

__all__ = ["DiagCurvature", "diag"]


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



def diag(loss: TaskLoss, phi: jnp.ndarray, observations: Any = None) -> DiagCurvature:
    """The exact diagonal of the per-task Hessian (d batched HVPs; memory (tasks, d))."""
    _, hvp = jax.linearize(jax.grad(lambda p: jnp.sum(loss(p))), phi)
    num_tasks, dim = phi.shape

    def entry(k):
        e = jax.nn.one_hot(jnp.broadcast_to(k, (num_tasks,)), dim, dtype=phi.dtype)
        return hvp(e)[:, k]

    return DiagCurvature(jnp.transpose(jax.lax.map(entry, np.arange(dim))))



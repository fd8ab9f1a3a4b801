"""The per-task block helpers every curvature structure is built from, and what builders read.

A curvature builder is called as ``build(loss, phi, observations)`` with ``loss(Φ) -> (tasks,)``
over Φ of shape (tasks, d). Since ℓ_j depends on φ_j alone (checked by the handler at trace
time), the Hessian of Σ_j ℓ_j is block diagonal, and d batched Hessian-vector products (one per
basis vector, applied to all tasks at once) give every task's d×d block; a (tasks·d)×(tasks·d)
matrix is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from numpyro_hbmeta.curvature.kfac import LayerPoints

__all__ = ["Observations", "TaskLoss", "hessian_blocks", "jacobian_blocks", "linear_blocks"]

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


class Observations(Protocol):
    """What the Fisher-type builders read
    (:class:`numpyro_hbmeta.marginal.fisher.TaskObservations`)."""

    def whitened_jacobian(self, phi: jnp.ndarray) -> jnp.ndarray: ...

    def kfac_statistics(self, phi: jnp.ndarray, rng_key: jax.Array
                        ) -> tuple[tuple[LayerPoints, ...], np.ndarray]: ...


def check_damping(name: str, damping: float) -> None:
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{name}: damping must be a finite number ≥ 0, got {damping!r}")


def need_observations(name: str, observations: Observations | None) -> Observations:
    if observations is None:
        raise ValueError(f"curvature={name!r} reads the model's observation sites: call it "
                         "as build(loss, phi, observations) (meta_marginal does)")
    return observations



"""What an inner solve reports per task: :class:`InnerInfo`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_hbmeta.curvature.base import TaskLoss

__all__ = ["InnerInfo", "value_and_grad"]


class InnerInfo(NamedTuple):
    """Diagnostics of an inner solve, per task, each of shape (tasks,); no gradient flows
    through them.

    Attributes:
        loss: loss at the start Φ⁰.
        final_loss: loss at the returned φ̂ (after the last GD step; at the optimum for Newton).
        grad_norm: Euclidean norm of the last gradient evaluated (GD: at the iterate before
            the last step; Newton: at φ̂).
        num_steps: steps taken (GD: K; Newton: iterations until the task stopped).
        converged: GD: not ``diverged``. Newton: the last step was below ``tol`` relative to
            ‖φ‖∞ *and* the gradient is small relative to the loss (:class:`Newton`); a task
            neither converged nor diverged, with ``num_steps < max_steps``, stopped because
            no step along its direction decreased the loss (the line search failed).
        diverged_at: the 1-based step after which the task first went wrong (GD: its loss
            rose, or a loss or iterate was non-finite; Newton: a non-finite loss or gradient),
            0 where none did. Tells a driver whether a smaller step size (GD) is the remedy
            and where the trouble started, without re-running the solve.
        diverged: the solve blew up (GD: any iterate or loss non-finite, or the loss rose;
            Newton: non-finite loss, iterate or gradient at φ̂).
    """

    loss: jnp.ndarray
    final_loss: jnp.ndarray
    grad_norm: jnp.ndarray
    num_steps: jnp.ndarray
    converged: jnp.ndarray
    diverged_at: jnp.ndarray
    diverged: jnp.ndarray


def value_and_grad(loss: TaskLoss, phi: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    values, pullback = jax.vjp(loss, phi)
    (grads,) = pullback(jnp.ones_like(values))
    return values, grads


"""Inner solvers: each task's φ̂_j from the globals, batched over tasks.

A solver takes a per-task loss ``loss(Φ) -> (tasks,)`` over Φ of shape (tasks, d) (the flat
unconstrained task parameters) and a start Φ⁰, and returns ``(phi_hat, InnerInfo)``.

* :class:`TruncatedGD` is MAML's inner loop (Finn et al. 2017; Grant et al., ICLR 2018, §3.1,
  eq. 3): K steps φ ← φ − β ∇ℓ(φ) from φ⁰ = E[φ | θ]. On the support negative log-likelihood
  (``prior="implicit"``) it is MAML, whose early stopping acts as a Gaussian prior (Santos 1996;
  :func:`numpyro_hbmeta.implicit_prior`); on the negative log joint (``prior="explicit"``) it is
  truncated MAP gradient descent. Gradients flow through the unrolled loop (second order)
  unless ``first_order=True``.
* :class:`Newton` converges to the task MAP of the negative log joint, and differentiates
  through the optimum by the implicit function theorem (``jax.lax.custom_root``), not by
  unrolling: dφ̂/dθ = −H⁻¹ ∂²ℓ/∂φ∂θ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature import jacobian_blocks, linear_blocks

__all__ = ["InnerInfo", "Newton", "TruncatedGD"]

TaskLoss = Callable[[jnp.ndarray], jnp.ndarray]


class InnerInfo(NamedTuple):
    """Diagnostics of an inner solve, per task (no gradient flows through them).

    Attributes:
        loss: loss at the start Φ⁰.
        final_loss: loss at the last iterate where it was evaluated (before the last GD step;
            at φ̂ for Newton).
        grad_norm: Euclidean norm of the last gradient evaluated.
        num_steps: steps taken.
        converged: Newton: the step fell below ``tol``; GD: finite and the loss did not grow.
    """

    loss: jnp.ndarray
    final_loss: jnp.ndarray
    grad_norm: jnp.ndarray
    num_steps: jnp.ndarray
    converged: jnp.ndarray


def _value_and_grad(loss: TaskLoss, phi: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    values, pullback = jax.vjp(loss, phi)
    (grads,) = pullback(jnp.ones_like(values))
    return values, grads


@dataclasses.dataclass(frozen=True)
class TruncatedGD:
    """K steps of gradient descent of size β, MAML's inner loop.

    Args:
        num_steps: K.
        step_size: β.
        prior: ``"implicit"`` descends the support negative log-likelihood (MAML: the prior
            is the one early stopping implies); ``"explicit"`` descends the negative log joint.
        first_order: stop gradients through the inner loop (first-order MAML).
        checkpoint: rematerialise each step in the backward pass (memory of one step's
            activations per step instead of all of them).
    """

    num_steps: int
    step_size: float
    _: dataclasses.KW_ONLY
    prior: str = "implicit"
    first_order: bool = False
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if int(self.num_steps) != self.num_steps or self.num_steps < 0:
            raise ValueError(f"TruncatedGD: num_steps must be a non-negative integer, "
                             f"got {self.num_steps!r}")
        if not self.step_size > 0:
            raise ValueError(f"TruncatedGD: step_size must be positive, got {self.step_size!r}")
        if self.prior not in ("implicit", "explicit"):
            raise ValueError(f"TruncatedGD: prior must be 'implicit' or 'explicit', "
                             f"got {self.prior!r}")

    def solve(self, loss: TaskLoss, phi0: jnp.ndarray) -> tuple[jnp.ndarray, InnerInfo]:
        """Run K steps from ``phi0`` (tasks, d); returns φ̂ and diagnostics."""

        def step(phi, _):
            values, grads = _value_and_grad(loss, phi)
            if self.first_order:
                grads = jax.lax.stop_gradient(grads)
            return phi - self.step_size * grads, (values, grads)

        if self.checkpoint:
            step = jax.checkpoint(step)
        if self.num_steps == 0:
            values = loss(phi0)
            zeros = np.zeros(phi0.shape[0], phi0.dtype)
            info = InnerInfo(values, values, zeros, np.zeros(phi0.shape[0], np.int32),
                             jnp.isfinite(values))
            return phi0, jax.lax.stop_gradient(info)
        phi, (values, grads) = jax.lax.scan(step, phi0, None, length=self.num_steps)
        first, last = values[0], values[-1]
        info = InnerInfo(
            loss=first,
            final_loss=last,
            grad_norm=jnp.linalg.norm(grads[-1], axis=-1),
            num_steps=np.full(phi0.shape[0], self.num_steps, np.int32),
            converged=jnp.all(jnp.isfinite(phi), -1) & jnp.isfinite(last) & (last <= first),
        )
        return phi, jax.lax.stop_gradient(info)


@dataclasses.dataclass(frozen=True)
class Newton:
    """Newton's method to the task MAP, with implicit-function-theorem gradients.

    Each iteration solves H_j Δ_j = g_j with every task's Hessian from d batched HVPs and
    takes the step length in {1, ½, ¼, ⅛} that most reduces ‖g_j‖ (a residual line search that
    needs only the gradient, which is all ``custom_root`` lets the solver see). A task has
    converged when its step is below ``tol``·(1 + ‖φ_j‖∞), the tolerance floored at 10 machine
    epsilons of the dtype (a float32 run cannot resolve 1e-8).

    Args:
        max_steps: iteration cap; tasks not converged by then are reported in ``InnerInfo``.
        tol: relative step tolerance.
    """

    _: dataclasses.KW_ONLY
    max_steps: int = 50
    tol: float = 1e-8
    prior: str = dataclasses.field(default="explicit", init=False)

    def __post_init__(self) -> None:
        if int(self.max_steps) != self.max_steps or self.max_steps < 1:
            raise ValueError(f"Newton: max_steps must be a positive integer, "
                             f"got {self.max_steps!r}")
        if not self.tol > 0:
            raise ValueError(f"Newton: tol must be positive, got {self.tol!r}")

    def solve(self, loss: TaskLoss, phi0: jnp.ndarray) -> tuple[jnp.ndarray, InnerInfo]:
        """Converge from ``phi0`` (tasks, d); gradients w.r.t. what ``loss`` closes over."""
        phi0 = jax.lax.stop_gradient(phi0)

        def gradient(phi):
            return _value_and_grad(loss, phi)[1]

        def tangent_solve(linear, rhs):
            # `linear` is the Hessian map at the root, block diagonal over tasks.
            blocks = linear_blocks(linear, *rhs.shape, rhs.dtype)
            return jnp.linalg.solve(blocks, rhs[..., None])[..., 0]

        # custom_root's JVP rule wants float auxiliaries; cast them back after.
        phi, (num_steps, converged) = jax.lax.custom_root(
            gradient, phi0, self._iterate, tangent_solve, has_aux=True)
        num_steps, converged = num_steps.astype(jnp.int32), converged > 0.5
        values, grads = _value_and_grad(loss, jax.lax.stop_gradient(phi))
        info = InnerInfo(loss(phi0), values, jnp.linalg.norm(grads, axis=-1), num_steps,
                         converged)
        return phi, jax.lax.stop_gradient(info)

    def _iterate(self, gradient, phi0):
        """Batched Newton iterations on the root of ``gradient``; returns
        (φ̂, (steps per task, converged per task))."""
        tol = max(self.tol, 10 * float(jnp.finfo(phi0.dtype).eps))
        fractions = np.array([1.0, 0.5, 0.25, 0.125], phi0.dtype)
        num_tasks = phi0.shape[0]

        def body(state):
            phi, grads, steps, done, it = state
            blocks = jacobian_blocks(gradient, phi)
            direction = jnp.linalg.solve(blocks, grads[..., None])[..., 0]
            trials = phi[None] - fractions[:, None, None] * direction[None]
            trial_grads = jax.vmap(gradient)(trials)
            norms = jnp.linalg.norm(trial_grads, axis=-1)
            norms = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
            best = jnp.argmin(norms, axis=0)
            new_phi = jnp.take_along_axis(trials, best[None, :, None], 0)[0]
            new_grads = jnp.take_along_axis(trial_grads, best[None, :, None], 0)[0]
            step = jnp.max(jnp.abs(new_phi - phi), -1)
            small = step <= tol * (1.0 + jnp.max(jnp.abs(phi), -1))
            keep = done[:, None]
            phi = jnp.where(keep, phi, new_phi)
            grads = jnp.where(keep, grads, new_grads)
            steps = jnp.where(done, steps, steps + 1)
            return phi, grads, steps, done | small, it + 1

        def cond(state):
            return (state[4] < self.max_steps) & ~jnp.all(state[3])

        init = (phi0, gradient(phi0), np.zeros(num_tasks, np.int32),
                np.zeros(num_tasks, bool), 0)
        phi, _, steps, done, _ = jax.lax.while_loop(cond, body, init)
        return phi, (steps.astype(phi.dtype), done.astype(phi.dtype))

"""Damped Newton to each task's MAP, differentiated by the implicit function theorem.

Converges to the task MAP of the negative log joint by Cholesky-based Newton steps
(Levenberg–Marquardt-damped where a block is not positive definite) with a backtracking Armijo
line search on the task's own loss, and differentiates through the optimum with
``jax.lax.custom_root``, not by unrolling: dφ̂/dθ = −H⁻¹ ∂²ℓ/∂φ∂θ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta import validate
from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature.base import TaskLoss, linear_blocks
from numpyro_hbmeta.inner.info import InnerInfo, value_and_grad

__all__ = ["Newton"]

_ARMIJO = 1e-4        # c₁ of the sufficient-decrease condition (Nocedal & Wright, §3.1)
_MAX_HALVINGS = 30    # α down to 2⁻³⁰ ≈ 1e-9 before the line search gives up


def _gradient_and_hessian(gradient: Callable, phi: jnp.ndarray):
    """∇ℓ (tasks, d) and the per-task Hessian blocks (tasks, d, d) from one linearisation."""
    grads, linear = jax.linearize(gradient, phi)
    hessians = linear_blocks(linear, *phi.shape, phi.dtype)
    return grads, 0.5 * (hessians + jnp.swapaxes(hessians, -1, -2))


def _cholesky_solve(matrices: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """M_j⁻¹ r_j by Cholesky; NaN where M_j is not positive definite."""
    inv = linalg.triangular_inverse(linalg.cholesky(matrices))   # M⁻¹ = L⁻ᵀ L⁻¹
    return jnp.einsum("...ki,...kl,...l->...i", inv, inv, rhs)


def _descent_direction(hessians: jnp.ndarray, grads: jnp.ndarray) -> jnp.ndarray:
    """Newton direction −H⁻¹g, Levenberg–Marquardt damped where H is not positive definite.

    Where the Cholesky factor of H_j fails, H_j + μ_j I is used with μ_j the Gershgorin shift
    max_i(Σ_{k≠i}|H_ik| − H_ii) plus √ε·(1 + max_i(|H_ii| + Σ_{k≠i}|H_ik|)), which makes every
    Gershgorin disc, hence every eigenvalue, positive (a loose but cheap bound; the line search
    fixes the length and near a strict minimum H is positive definite, so the undamped step and
    its quadratic convergence return). Where the result is still not a finite descent direction
    (gᵀd ≥ 0, e.g. a non-finite Hessian) the steepest-descent direction −g is used.
    """
    newton = -_cholesky_solve(hessians, grads)
    diagonal = jnp.diagonal(hessians, axis1=-2, axis2=-1)
    radius = jnp.sum(jnp.abs(hessians), -1) - jnp.abs(diagonal)
    eps = float(jnp.finfo(grads.dtype).eps)
    shift = (jnp.maximum(0.0, jnp.max(radius - diagonal, -1))
             + math.sqrt(eps) * (1 + jnp.max(jnp.abs(diagonal) + radius, -1)))
    eye = np.eye(grads.shape[-1], dtype=grads.dtype)
    damped = -_cholesky_solve(hessians + shift[:, None, None] * eye, grads)
    positive = jnp.all(jnp.isfinite(newton), -1)
    direction = jnp.where(positive[:, None], newton, damped)
    descent = jnp.all(jnp.isfinite(direction), -1) & (jnp.sum(direction * grads, -1) < 0)
    return jnp.where(descent[:, None], direction, -grads)


def _backtrack(loss: TaskLoss, phi, value, grads, direction):
    """Backtracking line search per task (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
    Alg. 3.1): α = 1, ½, ¼, ... (at most ``_MAX_HALVINGS`` halvings) until

        ℓ(φ + αd) ≤ ℓ(φ) + c₁ α gᵀd,    c₁ = 1e-4,

    a non-finite ℓ(φ + αd) counting as a rejection (so an overflowing full step is halved, not
    taken). Values resolve the minimiser only to about √ε (rounding in ℓ swamps a decrease of
    ½ gᵀH⁻¹g below ε·Σ|terms|), so where the predicted decrease −gᵀd is itself below
    √ε (1 + |ℓ|) a step whose value is within that band is accepted too: there the Newton
    step, not the values, carries the last digits.

    Returns:
        (φ + αd, ℓ(φ + αd), accepted), per task; unaccepted tasks keep φ and ℓ(φ).
    """
    slope = jnp.sum(grads * direction, -1)
    band = math.sqrt(float(jnp.finfo(value.dtype).eps)) * (1 + jnp.abs(value))
    flat = -slope <= band

    def body(state):
        alpha, accepted, best, best_value, halvings = state
        trial = phi + alpha[:, None] * direction
        trial_value = loss(trial)
        ok = jnp.isfinite(trial_value) & (
            (trial_value <= value + _ARMIJO * alpha * slope)
            | (flat & (trial_value <= value + band)))
        new = ok & ~accepted
        best = jnp.where(new[:, None], trial, best)
        best_value = jnp.where(new, trial_value, best_value)
        accepted = accepted | ok
        return jnp.where(accepted, alpha, 0.5 * alpha), accepted, best, best_value, halvings + 1

    def cond(state):
        return (state[4] <= _MAX_HALVINGS) & ~jnp.all(state[1])

    init = (jnp.ones_like(value), jnp.zeros(value.shape, bool), phi, value, 0)
    _, accepted, best, best_value, _ = jax.lax.while_loop(cond, body, init)
    return best, best_value, accepted


def _relative_gradient(value, grads, phi) -> jnp.ndarray:
    """‖g‖∞ (1 + ‖φ‖∞) / (1 + |ℓ|): the change in ℓ, relative to ℓ, from moving φ by its own
    size at the current slope (Dennis & Schnabel 1996, *Numerical Methods for Unconstrained
    Optimization*, §7.2, the scale-free "relative gradient")."""
    scale = (1 + jnp.max(jnp.abs(phi), -1)) / (1 + jnp.abs(value))
    return jnp.max(jnp.abs(grads), -1) * scale


@dataclasses.dataclass(frozen=True)
class Newton:
    """Damped Newton's method to the task MAP, with implicit-function-theorem gradients.

    Each iteration takes every task's Hessian H_j from d batched HVPs, the direction
    d_j = −H_j⁻¹ g_j (Levenberg–Marquardt damped where H_j is not positive definite, −g_j
    where even that fails; :func:`_descent_direction`) and a backtracking Armijo line search
    on the task's own loss (Nocedal & Wright, Alg. 3.1; non-finite trial values are rejected),
    so a start far from the mode, where the full step overflows, still gets there; near a
    strict minimum the full step is accepted and convergence is quadratic.

    A task has converged when (a) its last step was below ``tol``·(1 + ‖φ_j‖∞), ``tol``
    floored at 10 machine epsilons of the dtype (a float32 run cannot resolve 1e-8), and (b)
    its relative gradient ‖g_j‖∞ (1 + ‖φ_j‖∞)/(1 + |ℓ_j|) is below max(``tol``, ε^⅓)
    (Dennis & Schnabel 1996, §7.2; ε^⅓ is their default gradient tolerance, above the
    rounding of g). (a) alone is fooled by a line search that cut the step to nothing far from
    the mode; (b) alone depends on the scale of ℓ. In the quadratic regime (b) holds one
    iteration after (a).

    Args:
        max_steps: iteration cap; tasks not converged by then are reported in ``InnerInfo``.
        tol: relative step tolerance.
    """

    _: dataclasses.KW_ONLY
    max_steps: int = 50
    tol: float = 1e-8
    prior: str = dataclasses.field(default="explicit", init=False)

    def __post_init__(self) -> None:
        validate.positive_int(self.max_steps, "Newton: max_steps")
        validate.positive_number(self.tol, "Newton: tol")

    def _tolerances(self, dtype) -> tuple[float, float]:
        eps = float(jnp.finfo(dtype).eps)
        step_tol = max(self.tol, 10 * eps)
        return step_tol, max(step_tol, eps ** (1 / 3))

    def solve(self, loss: TaskLoss, phi0: jnp.ndarray) -> tuple[jnp.ndarray, InnerInfo]:
        """Converge from ``phi0`` (tasks, d); gradients w.r.t. what ``loss`` closes over."""
        phi0 = jax.lax.stop_gradient(phi0)

        def gradient(phi):
            return value_and_grad(loss, phi)[1]

        def tangent_solve(linear, rhs):
            # `linear` is the Hessian map at the root, block diagonal over tasks.
            blocks = linear_blocks(linear, *rhs.shape, rhs.dtype)
            return jnp.linalg.solve(blocks, rhs[..., None])[..., 0]

        # custom_root's JVP rule wants float auxiliaries; cast them back after. The solve
        # closes over `loss` for the line search; custom_root does not differentiate it.
        phi, (num_steps, converged, step_small) = jax.lax.custom_root(
            gradient, phi0, functools.partial(self._iterate, loss), tangent_solve,
            has_aux=True)
        phi_hat = jax.lax.stop_gradient(phi)
        values, grads = value_and_grad(loss, phi_hat)
        num_steps = num_steps.astype(jnp.int32)
        _, grad_tol = self._tolerances(phi.dtype)
        diverged = (~jnp.isfinite(values) | ~jnp.all(jnp.isfinite(phi_hat), -1)
                    | ~jnp.all(jnp.isfinite(grads), -1))
        # The loop checks convergence at the top of an iteration, so a task that used its
        # last allowed step is checked here, at φ̂.
        converged = ((converged > 0.5) | ((step_small > 0.5)
                     & (_relative_gradient(values, grads, phi_hat) <= grad_tol))) & ~diverged
        info = InnerInfo(loss(phi0), values, jnp.linalg.norm(grads, axis=-1), num_steps,
                         converged, jnp.where(diverged, jnp.maximum(num_steps, 1), 0),
                         diverged)
        return phi, jax.lax.stop_gradient(info)

    def _iterate(self, loss: TaskLoss, gradient: Callable, phi0: jnp.ndarray):
        """Batched damped Newton iterations; returns (φ̂, (steps, converged, last step small)
        per task, as floats)."""
        step_tol, grad_tol = self._tolerances(phi0.dtype)
        num_tasks = phi0.shape[0]

        def body(state):
            phi, value, step_small, steps, converged, stopped = state
            grads, hessians = _gradient_and_hessian(gradient, phi)
            converged = converged | (~stopped & step_small
                                     & (_relative_gradient(value, grads, phi) <= grad_tol))
            stopped = stopped | converged
            active = ~stopped & (steps < self.max_steps)
            direction = _descent_direction(hessians, grads)
            trial, trial_value, accepted = _backtrack(loss, phi, value, grads, direction)
            move = active & accepted
            step = jnp.where(move, jnp.max(jnp.abs(trial - phi), -1), 0.0)
            step_small = jnp.where(active, step <= step_tol * (1 + jnp.max(jnp.abs(phi), -1)),
                                   step_small)
            phi = jnp.where(move[:, None], trial, phi)
            value = jnp.where(move, trial_value, value)
            # No acceptable step along a descent direction: stop (not converged unless the
            # gradient test passes at φ̂ in `solve`).
            stopped = stopped | (active & ~accepted)
            return phi, value, step_small, steps + active, converged, stopped

        def cond(state):
            return jnp.any(~state[5] & (state[3] < self.max_steps))

        false = np.zeros(num_tasks, bool)
        init = (phi0, loss(phi0), false, np.zeros(num_tasks, np.int32), false, false)
        phi, _, step_small, steps, converged, _ = jax.lax.while_loop(cond, body, init)
        return phi, tuple(x.astype(phi.dtype) for x in (steps, converged, step_small))

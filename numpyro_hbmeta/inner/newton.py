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
from numpyro_hbmeta.curvature.base import TaskLoss, linear_blocks
from numpyro_hbmeta.curvature.full import (
    SMALL_DIM,
    cholesky,
    cholesky_solve,
    triangular_inverse,
)
from numpyro_hbmeta.inner.info import InnerInfo, value_and_grad

__all__ = ["Newton"]

_ARMIJO = 1e-4        # c₁ of the sufficient-decrease condition (Nocedal & Wright, §3.1)
_MAX_HALVINGS = 30    # α down to 2⁻³⁰ ≈ 1e-9 before the line search gives up


def _gradient_and_hessian(gradient: Callable, phi: jnp.ndarray):
    """∇ℓ (tasks, d) and the per-task Hessian blocks (tasks, d, d) from one linearisation."""
    grads, linear = jax.linearize(gradient, phi)
    hessians = linear_blocks(linear, *phi.shape, phi.dtype)
    return grads, 0.5 * (hessians + jnp.swapaxes(hessians, -1, -2))


_cholesky_solve = cholesky_solve   # M_j⁻¹ r_j; NaN where M_j is not positive definite


def _factor_inverse(matrices: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(L⁻¹ of the Cholesky factor, zero where it failed; where it did not fail)."""
    inv = triangular_inverse(cholesky(matrices))
    ok = jnp.all(jnp.isfinite(inv), (-2, -1))
    # Zero, not NaN, where it failed: a transposed solve multiplies the unselected branch by
    # a zero cotangent, and 0·NaN would poison the selected one.
    return jnp.where(ok[..., None, None], inv, 0.0), ok


def _apply_inverse(inv: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """L⁻ᵀ L⁻¹ r in products and sums (XLA fuses them; a batched dot of 2×2 blocks not)."""
    half = jnp.sum(inv * rhs[..., None, :], -1)
    return jnp.sum(inv * half[..., :, None], -2)


def _hessian_solve(blocks: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """H_j⁻¹ r_j for the IFT tangent, with no LAPACK call for d ≤ ``SMALL_DIM``.

    By the Cholesky factor of H_j where H_j is positive definite (at a strict minimum,
    always). Where it is not (a saddle, an unconverged task) by the normal equations
    H_j² x = H_j r_j, H_j² being positive definite for any non-singular symmetric H_j, with
    one step of iterative refinement (the squared condition number costs accuracy); NaN where
    H_j² fails too (H_j singular). Every branch is computed and selected per task, so the
    solve stays linear in r (custom_root transposes it). Larger blocks: LU, as
    ``jnp.linalg.solve``.
    """
    if blocks.shape[-1] > SMALL_DIM:
        return jnp.linalg.solve(blocks, rhs[..., None])[..., 0]
    inv, positive = _factor_inverse(blocks)
    direct = _apply_inverse(inv, rhs)
    sym = 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))
    matvec = lambda v: jnp.sum(sym * v[..., None, :], -1)  # noqa: E731
    square = jnp.sum(sym[..., :, :, None] * sym[..., None, :, :], -2)     # H², symmetric
    inv_sq, regular = _factor_inverse(square)
    normal = _apply_inverse(inv_sq, matvec(rhs))
    normal = normal + _apply_inverse(inv_sq, matvec(rhs - matvec(normal)))
    fallback = jnp.where(regular[..., None], normal, jnp.nan)
    return jnp.where(positive[..., None], direct, fallback)


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


def _backtrack(loss: TaskLoss, phi, value, grads, direction, active):
    """Backtracking line search per task (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
    Alg. 3.1): α = 1, ½, ¼, ... (at most ``_MAX_HALVINGS`` halvings) until

        ℓ(φ + αd) ≤ ℓ(φ) + c₁ α gᵀd,    c₁ = 1e-4,

    a non-finite ℓ(φ + αd) counting as a rejection (so an overflowing full step is halved, not
    taken). Values resolve the minimiser only to about √ε (rounding in ℓ swamps a decrease of
    ½ gᵀH⁻¹g below ε·Σ|terms|), so where the predicted decrease −gᵀd is itself below
    √ε (1 + |ℓ|) a step whose value is within that band is accepted too: there the Newton
    step, not the values, carries the last digits.

    Tasks not ``active`` are not searched (they count as accepted and keep φ).

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

    init = (jnp.ones_like(value), ~active, phi, value, 0)
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

    A task has converged when (a) its next step d_j, the one Newton would take from φ_j, is
    below ``tol``·(1 + ‖φ_j‖∞), ``tol`` floored at 10 machine epsilons of the dtype (a float32
    run cannot resolve 1e-8), and (b) its relative gradient ‖g_j‖∞ (1 + ‖φ_j‖∞)/(1 + |ℓ_j|) is
    below max(``tol``, ε^⅓) (Dennis & Schnabel 1996, §7.2; ε^⅓ is their default gradient
    tolerance, above the rounding of g); that last step is then taken, without a line search
    (it is below the tolerance). (a) is the full Newton step, which a line search cannot cut
    to nothing far from the mode; (b) alone depends on the scale of ℓ. A task whose first step
    lands on its mode (a linear-Gaussian one) is done after two Hessians and one line search.
    ``InnerInfo.final_loss`` and ``grad_norm`` are those of the iterate that passed the test,
    before that last step.

    Blocks of d ≤ :data:`~numpyro_hbmeta.curvature.full.SMALL_DIM` are factorised in
    unrolled elementwise ``jnp`` arithmetic (no LAPACK call); so is the tangent solve of the
    implicit gradient, by Cholesky where H_j is positive definite (:func:`_hessian_solve`).

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
            return _hessian_solve(blocks, rhs)

        # custom_root's JVP rule wants float auxiliaries; cast them back after. The solve
        # closes over `loss` for the line search; custom_root does not differentiate it. The
        # loop hands back ℓ and ∇ℓ at φ̂ and ℓ(φ₀), which it computed anyway.
        phi, (num_steps, converged, step_small, values, grads, initial) = jax.lax.custom_root(
            gradient, phi0, functools.partial(self._iterate, loss), tangent_solve,
            has_aux=True)
        phi_hat = jax.lax.stop_gradient(phi)
        num_steps = num_steps.astype(jnp.int32)
        _, grad_tol = self._tolerances(phi.dtype)
        diverged = (~jnp.isfinite(values) | ~jnp.all(jnp.isfinite(phi_hat), -1)
                    | ~jnp.all(jnp.isfinite(grads), -1))
        # The loop has tested every task at its last iterate (a task stopped by a failed line
        # search, or out of steps, included); the test is repeated here on what it returned.
        converged = ((converged > 0.5) | ((step_small > 0.5)
                     & (_relative_gradient(values, grads, phi_hat) <= grad_tol))) & ~diverged
        info = InnerInfo(initial, values, jnp.linalg.norm(grads, axis=-1), num_steps,
                         converged, jnp.where(diverged, jnp.maximum(num_steps, 1), 0),
                         diverged)
        return phi, jax.lax.stop_gradient(info)

    def _iterate(self, loss: TaskLoss, gradient: Callable, phi0: jnp.ndarray):
        """Batched damped Newton iterations; returns (φ̂, (steps, converged, step small) per
        task as floats, ℓ and ∇ℓ at the last tested iterate, ℓ(φ₀)).

        Each iteration takes ∇ℓ, the Hessian blocks and the direction d at the iterate, tests
        convergence, and steps the tasks still active. A task has converged when d, the step
        Newton would take next, is below the step tolerance and its relative gradient below
        the gradient tolerance; that last step is then taken as is (below the tolerance, in
        the quadratic regime) after the loop, so a task whose first step lands on the mode (a
        linear-Gaussian one) is done in two iterations, with two Hessians.
        """
        step_tol, grad_tol = self._tolerances(phi0.dtype)
        num_tasks = phi0.shape[0]

        def body(state):
            phi, value, grads, direction, step_small, steps, converged, stopped = state
            grads_now, hessians = _gradient_and_hessian(gradient, phi)
            direction_now = _descent_direction(hessians, grads_now)
            small = (jnp.max(jnp.abs(direction_now), -1)
                     <= step_tol * (1 + jnp.max(jnp.abs(phi), -1)))
            # Stopped tasks keep what was tested at their last iterate.
            grads = jnp.where(stopped[:, None], grads, grads_now)
            direction = jnp.where(stopped[:, None], direction, direction_now)
            step_small = jnp.where(stopped, step_small, small)
            converged = converged | (~stopped & small
                                     & (_relative_gradient(value, grads, phi) <= grad_tol))
            # Tested at its current iterate: a task out of steps stops here.
            stopped = stopped | converged | (steps >= self.max_steps)
            active = ~stopped
            trial, trial_value, accepted = _backtrack(loss, phi, value, grads, direction,
                                                       active)
            move = active & accepted
            phi = jnp.where(move[:, None], trial, phi)
            value = jnp.where(move, trial_value, value)
            # No acceptable step along a descent direction: stop (not converged unless the
            # gradient test passes at φ̂ in `solve`). A task that moved is tested at its new
            # iterate in the next iteration, so every task leaves the loop tested where it is.
            stopped = stopped | (active & ~accepted)
            return phi, value, grads, direction, step_small, steps + active, converged, stopped

        def cond(state):
            return jnp.any(~state[7])

        false = np.zeros(num_tasks, bool)
        initial = loss(phi0)
        init = (phi0, initial, jnp.zeros_like(phi0), jnp.zeros_like(phi0), false,
                np.zeros(num_tasks, np.int32), false, false)
        phi, value, grads, direction, step_small, steps, converged, _ = jax.lax.while_loop(
            cond, body, init)
        # The converged tasks' last, below-tolerance Newton step.
        phi = jnp.where(converged[:, None], phi + direction, phi)
        steps = jnp.where(converged, jnp.minimum(steps + 1, self.max_steps), steps)
        flags = tuple(x.astype(phi.dtype) for x in (steps, converged, step_small))
        return phi, (*flags, value, grads, initial)

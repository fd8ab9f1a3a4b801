"""Inner solvers: each task's φ̂_j from the globals, batched over tasks.

A solver takes a per-task loss ``loss(Φ) -> (tasks,)`` over Φ of shape (tasks, d) (the flat
unconstrained task parameters) and a start Φ⁰, and returns ``(phi_hat, InnerInfo)``.

* :class:`TruncatedGD` is MAML's inner loop (Finn et al. 2017; Grant et al., ICLR 2018, §3.1,
  eq. 3): K steps φ ← φ − β ∇ℓ(φ) from φ⁰ = E[φ | θ]. On the support negative log-likelihood
  (``prior="implicit"``) it is MAML, whose early stopping acts as a Gaussian prior (Santos 1996;
  :func:`numpyro_hbmeta.implicit_prior`); on the negative log joint (``prior="explicit"``) it is
  truncated MAP gradient descent. Gradients flow through the unrolled loop (second order)
  unless ``first_order=True``.
* :class:`Newton` converges to the task MAP of the negative log joint by damped Newton steps
  with a backtracking line search on the task's own loss, and differentiates through the
  optimum by the implicit function theorem (``jax.lax.custom_root``), not by unrolling:
  dφ̂/dθ = −H⁻¹ ∂²ℓ/∂φ∂θ.

Neither hands back a number it cannot vouch for: :class:`InnerInfo` says, per task, whether the
solve converged or diverged, and :func:`max_eigenvalue` / :func:`stable_step_size` give the
curvature a driver needs to name the remedy (a step size below 1/λ_max).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta import linalg, validate
from numpyro_hbmeta.curvature import hessian_blocks, linear_blocks

__all__ = ["InnerInfo", "Newton", "TruncatedGD", "max_eigenvalue", "stable_step_size"]

TaskLoss = Callable[[jnp.ndarray], jnp.ndarray]


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


def _value_and_grad(loss: TaskLoss, phi: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    values, pullback = jax.vjp(loss, phi)
    (grads,) = pullback(jnp.ones_like(values))
    return values, grads


def _gd_info(values: jnp.ndarray, final: jnp.ndarray, last_grads: jnp.ndarray,
             finite: jnp.ndarray) -> InnerInfo:
    """Diagnostics of K GD steps from the losses ℓ(φ^0..φ^{K−1}) (K, tasks), ℓ(φ^K) and the
    per-step finiteness of the iterates φ^1..φ^K (K, tasks).

    A step "rose" when ℓ(φ^k) > ℓ(φ^{k−1}) + √ε (1 + |ℓ(φ^{k−1})|), or ℓ(φ^k) exceeds ℓ(φ⁰)
    by as much. On a quadratic, GD with βλ ≤ 2 along every direction never raises the loss
    (each component is multiplied by (1 − βλ)² ≤ 1), and on a smooth loss neither does a step
    below 2/L (the descent lemma), so a rise means β is too large where the iterate went.
    √ε (half the digits, ≈ 3e-4 in float32) sits well above the rounding of a sum of a few
    hundred terms (~√n ε relative) and the "1 +" floors it at √ε nats when ℓ ≈ 0.
    """
    losses = jnp.concatenate([values, final[None]])
    tol = math.sqrt(float(jnp.finfo(losses.dtype).eps))
    before, after = losses[:-1], losses[1:]
    rose = ((after > before + tol * (1 + jnp.abs(before)))
            | (after > losses[0] + tol * (1 + jnp.abs(losses[0]))))
    bad = rose | ~jnp.isfinite(after) | ~finite
    any_bad = jnp.any(bad, 0)
    diverged = any_bad | ~jnp.isfinite(losses[0])
    return InnerInfo(
        loss=losses[0],
        final_loss=final,
        grad_norm=jnp.linalg.norm(last_grads, axis=-1),
        num_steps=np.full(final.shape, values.shape[0], np.int32),
        converged=~diverged,
        diverged_at=jnp.where(any_bad, jnp.argmax(bad, 0) + 1, 0).astype(jnp.int32),
        diverged=diverged,
    )


@dataclasses.dataclass(frozen=True)
class TruncatedGD:
    """K steps of gradient descent of size β, MAML's inner loop.

    GD contracts along a Hessian eigenvector with eigenvalue λ iff 0 < βλ < 2; with βλ > 2
    the loss grows by (1 − βλ)² per step and ``InnerInfo.diverged`` is set for that task.
    :func:`max_eigenvalue` and :func:`stable_step_size` give a β that is safe.

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
        validate.non_negative_int(self.num_steps, "TruncatedGD: num_steps")
        validate.positive_number(self.step_size, "TruncatedGD: step_size")
        if self.prior not in ("implicit", "explicit"):
            raise validate.InputError(f"TruncatedGD: prior must be 'implicit' or 'explicit', "
                             f"got {self.prior!r}")

    def solve(self, loss: TaskLoss, phi0: jnp.ndarray) -> tuple[jnp.ndarray, InnerInfo]:
        """Run K steps from ``phi0`` (tasks, d); returns φ̂ and diagnostics.

        The diagnostics cost one extra evaluation of ``loss`` at φ̂ (no gradient), which
        XLA drops when nothing reads them.
        """

        def step(phi, _):
            values, grads = _value_and_grad(loss, phi)
            if self.first_order:
                grads = jax.lax.stop_gradient(grads)
            new_phi = phi - self.step_size * grads
            return new_phi, (values, grads, jnp.all(jnp.isfinite(new_phi), -1))

        if self.checkpoint:
            step = jax.checkpoint(step)
        if self.num_steps == 0:
            values = loss(phi0)
            zeros = np.zeros(phi0.shape[0], np.int32)
            info = InnerInfo(values, values, np.zeros(phi0.shape[0], phi0.dtype), zeros,
                             jnp.isfinite(values), zeros, ~jnp.isfinite(values))
            return phi0, jax.lax.stop_gradient(info)
        phi, (values, grads, finite) = jax.lax.scan(step, phi0, None, length=self.num_steps)
        final = loss(jax.lax.stop_gradient(phi))
        return phi, jax.lax.stop_gradient(_gd_info(values, final, grads[-1], finite))


def max_eigenvalue(loss: TaskLoss, phi: jnp.ndarray, *, num_iters: int = 100,
                   max_exact_dim: int = 64, rng_key: jax.Array | None = None) -> jnp.ndarray:
    """Largest-magnitude eigenvalue λ_max (signed) of each task's Hessian of ``loss`` at Φ.

    For d ≤ ``max_exact_dim`` it is exact (to rounding): the (tasks, d, d) Hessian blocks from
    d batched Hessian-vector products (:func:`~numpyro_hbmeta.curvature.hessian_blocks`) and
    their eigenvalues. Above, it is power iteration on batched Hessian-vector products from a
    random start, returning the Rayleigh quotient vᵀHv of the last iterate: for a symmetric
    H its error is at most |λ_1 − λ_n| tan²∠(v⁰, u_1) (λ_2/λ_1)^(2k) after k iterations
    (Golub & Van Loan, *Matrix Computations*, 4th ed., §8.2.1), λ_2 the second-largest in
    magnitude, so it is accurate to rounding when the top eigenvalue is separated (λ_2/λ_1 ≤
    0.8 at k = 100) and only to a few digits when it is nearly repeated. Being a Rayleigh
    quotient it never exceeds λ_max in magnitude for a positive semi-definite H: step sizes
    derived from it are then slightly optimistic, never conservative; keep a margin.

    Gradient descent of size β diverges along a direction with βλ > 2 and the implicit prior
    of :func:`numpyro_hbmeta.implicit_prior` needs βλ < 1, so a driver calls this once,
    eagerly, to report "β = 0.3 but 1/λ_max = 0.02 for task 4" (see
    :func:`stable_step_size`). No gradient flows through it.

    Args:
        loss: per-task loss (tasks, d) -> (tasks,); ℓ_j must depend on φ_j alone.
        phi: (tasks, d) where to take the Hessians.
        num_iters: power iterations (d > ``max_exact_dim`` only).
        max_exact_dim: largest d for the exact path.
        rng_key: start of the power iteration (default ``PRNGKey(0)``).

    Returns:
        (tasks,) signed eigenvalue of largest magnitude.

    Examples:
        >>> import jax.numpy as jnp
        >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([[4.0, 1.0], [-9.0, 2.0]]) * p**2, -1)
        >>> max_eigenvalue(loss, jnp.zeros((2, 2))).tolist()
        [4.0, -9.0]
    """
    phi = jax.lax.stop_gradient(phi)
    if phi.shape[-1] <= max_exact_dim:
        eigenvalues = linalg.eigvalsh(hessian_blocks(loss, phi))
        low, high = eigenvalues[..., 0], eigenvalues[..., -1]
        return jnp.where(jnp.abs(high) >= jnp.abs(low), high, low)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    _, hvp = jax.linearize(jax.grad(lambda p: jnp.sum(loss(p))), phi)

    def normalised(v):
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return v / jnp.where(norm > 0, norm, 1.0)

    v = normalised(jax.random.normal(rng_key, phi.shape, phi.dtype))
    v = jax.lax.fori_loop(0, num_iters, lambda _, v: normalised(hvp(v)), v)
    return jnp.sum(v * hvp(v), -1)


def stable_step_size(lambda_max: jnp.ndarray, *, margin: float = 0.5) -> jnp.ndarray:
    """A gradient-descent step size β = margin / |λ_max| for each task.

    Along a Hessian eigenvector GD multiplies the error by 1 − βλ: it diverges for βλ > 2,
    oscillates for 1 < βλ < 2, and only for βλ < 1 does the implicit Gaussian prior of K steps
    exist (q = ((1 − βλ)^(−K) − 1)/λ > 0; Santos 1996, Grant et al., ICLR 2018, §3.2). With
    margin < 1 every direction is in that regime with room for the curvature to grow along the
    path. Take the minimum over tasks for one β for all.

    Args:
        lambda_max: (tasks,) from :func:`max_eigenvalue`.
        margin: the target β·|λ_max|, in (0, 1) for a valid implicit prior, below 2 for
            mere stability.

    Returns:
        (tasks,) step sizes (inf where λ_max = 0).

    Examples:
        >>> stable_step_size(jnp.array([64.0, -2.0]), margin=0.5).tolist()
        [0.0078125, 0.25]
    """
    if not 0 < margin < 2:
        raise ValueError(f"stable_step_size: margin must be in (0, 2), got {margin!r}")
    return margin / jnp.abs(lambda_max)


# -- Newton ---------------------------------------------------------------------------------

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
            return _value_and_grad(loss, phi)[1]

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
        values, grads = _value_and_grad(loss, phi_hat)
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

"""MAML's inner loop, K steps of gradient descent from φ⁰ = E[φ | θ], and its stable step size.

Finn et al. 2017; Grant et al., ICLR 2018, §3.1, eq. 3: φ ← φ − β ∇ℓ(φ). On the support negative
log-likelihood (``prior="implicit"``) it is MAML, whose early stopping acts as a Gaussian prior
(Santos 1996; :func:`numpyro_hbmeta.implicit_prior`); on the negative log joint
(``prior="explicit"``) it is truncated MAP gradient descent. Gradient descent on a quadratic
diverges when β ≥ 2/λ_max: :func:`max_eigenvalue` and :func:`stable_step_size` name the bound.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta import validate
from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature.base import TaskLoss, hessian_blocks
from numpyro_hbmeta.inner.info import InnerInfo, value_and_grad

__all__ = ["TruncatedGD", "max_eigenvalue", "stable_step_size"]


def _gd_info(values: jnp.ndarray, final: jnp.ndarray, last_grad_norm: jnp.ndarray,
             finite: jnp.ndarray) -> InnerInfo:
    """Diagnostics of K GD steps from the losses ℓ(φ^0..φ^{K−1}) (K, tasks), ℓ(φ^K), the
    norm ‖∇ℓ(φ^{K−1})‖ (tasks,) and the per-step finiteness of the iterates φ^1..φ^K
    (K, tasks).

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
        grad_norm=last_grad_norm,
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

    **Second-order gradients and their memory.** The meta-gradient of a loss at φ^K flows back
    through all K steps φ^{k+1} = φ^k − β∇ℓ(φ^k) (each step's Jacobian is I − β∇²ℓ(φ^k), so
    the backward pass needs every φ^k). A plain ``lax.scan`` keeps every step's residuals:
    memory O(K·r), r the residuals of one step (at least |state| = tasks × d, a few times that
    with the Hessian-vector product's intermediates). ``checkpoint=True`` is two-level
    checkpointing (Griewank & Walther, *Evaluating Derivatives*, 2nd ed. 2008, ch. 12): the K
    steps are split into S = ⌊K/L⌋ segments of L = ⌊√K⌋ steps (and R = K − S·L < L steps
    left over, run last without checkpointing), an outer ``lax.scan`` over the segments whose
    body is the ``jax.checkpoint``-ed inner scan of L steps. The forward pass stores only the
    S ≤ √K + 2 segment-start states; the backward pass re-runs one segment at a time from its
    stored state and keeps that segment's L residuals while transposing it. Peak memory is

        S·|state| + L·r  ≈  √K·(|state| + r)  =  O(√K·|state|),

    and the compute is one extra forward pass: ≈ 2× the forward FLOPs of the plain loop
    before the backward pass (each step is evaluated twice, the backward once). The steps and
    their arithmetic are the same as the plain loop's (no padded or masked steps), so φ^K,
    ``InnerInfo`` and the meta-gradients agree with ``checkpoint=False`` to rounding (equal to
    ~1e-15 in float64; ``tests/inner/test_checkpoint.py``). Measured on the sinusoid net:
    ``docs/performance.md``, "Second-order MAML memory against the inner steps K".

    **Which route is which.** This class is truncated GD: the meta-gradient differentiates the
    K unrolled steps (second-order MAML; with ``checkpoint=True`` in O(√K) memory;
    ``first_order=True`` drops the second-order terms, memory O(1) in K). iMAML (Rajeswaran
    et al., NeurIPS 2019) is a different route: the inner problem with an explicit Gaussian
    prior (the proximal term ½λ‖φ − θ‖²) solved to convergence, and the meta-gradient from the
    implicit function theorem at the optimum, dφ̂/dθ = −H⁻¹ ∂²ℓ/∂φ∂θ, whose memory does not
    depend on the number of inner iterations at all. In this library that is
    :class:`~numpyro_hbmeta.Newton` (its prior is always ``"explicit"``: the negative log
    joint of the model, whose task prior p(φ | θ) plays the proximal term), with
    ``objective="maml"`` for iMAML's query-loss objective or ``objective="laplace"`` for the
    Laplace evidence. (iMAML solves H⁻¹v by conjugate gradients; ``Newton`` forms each task's
    d × d Hessian from d Hessian-vector products, exact but for moderate d.)
    ``TruncatedGD(prior="explicit")`` descends the same explicit objective but stops after K
    steps and differentiates the unrolled steps, not the optimum.

    Args:
        num_steps: K.
        step_size: β.
        prior: ``"implicit"`` descends the support negative log-likelihood (MAML: the prior
            is the one early stopping implies); ``"explicit"`` descends the negative log joint.
        first_order: stop gradients through the inner loop (first-order MAML).
        checkpoint: two-level (√K) checkpointing of the inner loop for second-order
            gradients: memory O(√K·|state|) instead of O(K·|state|), for about one more
            forward pass of compute (above). Same values and gradients.
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
            values, grads = value_and_grad(loss, phi)
            if self.first_order:
                grads = jax.lax.stop_gradient(grads)
            new_phi = phi - self.step_size * grads
            # The per-step outputs are (tasks,)-sized diagnostics only: stacking the (tasks, d)
            # gradients of every step would cost O(K·|φ|) whatever the checkpointing.
            grad_norm = jnp.linalg.norm(jax.lax.stop_gradient(grads), axis=-1)
            return new_phi, (values, grad_norm, jnp.all(jnp.isfinite(new_phi), -1))

        if self.num_steps == 0:
            values = loss(phi0)
            zeros = np.zeros(phi0.shape[0], np.int32)
            info = InnerInfo(values, values, np.zeros(phi0.shape[0], phi0.dtype), zeros,
                             jnp.isfinite(values), zeros, ~jnp.isfinite(values))
            return phi0, jax.lax.stop_gradient(info)
        scan = _checkpointed_scan if self.checkpoint else _plain_scan
        phi, (values, grad_norms, finite) = scan(step, phi0, self.num_steps)
        final = loss(jax.lax.stop_gradient(phi))
        return phi, jax.lax.stop_gradient(_gd_info(values, final, grad_norms[-1], finite))


def _plain_scan(step, carry, num_steps: int):
    """K steps in one ``lax.scan``: reverse mode keeps every step's residuals, O(K)."""
    return jax.lax.scan(step, carry, None, length=num_steps)


def _checkpointed_scan(step, carry, num_steps: int):
    """The same K steps, as two-level checkpointing (Griewank & Walther 2008, ch. 12).

    L = ⌊√K⌋ steps make a segment, S = ⌊K/L⌋ ≥ L segments run in an outer ``lax.scan`` whose
    body is the ``jax.checkpoint``-ed inner scan of L steps, and the R = K − S·L < L remaining
    steps run after them in a plain scan (their residuals are freed before the segments are
    re-run: checkpointing them too, or running them first, measured the same). The outer scan
    saves only the S segment-start carries; the backward pass re-runs one segment at a time,
    keeping its L steps' residuals while it is transposed. L = ⌊√K⌋ rather than ⌈√K⌉ keeps
    S ≥ 2 for K ≥ 2: with ⌈√K⌉, K = 5 gave one 3-step segment and a remainder of 2, and
    XLA's temporaries came out above the plain loop's (a one-trip loop is no checkpoint).
    ``prevent_cse`` stays on so that no backend can merge the recomputation into the forward
    pass. The steps, their order and their arithmetic are those of :func:`_plain_scan` (no
    padding, no masked steps); only what is stored and what is recomputed differ.
    """
    seg_len = math.isqrt(num_steps)
    num_segments, remainder = divmod(num_steps, seg_len)

    def segment(carry, _):
        return jax.lax.scan(step, carry, None, length=seg_len)

    carry, outputs = jax.lax.scan(jax.checkpoint(segment), carry, None, length=num_segments)
    outputs = jax.tree.map(lambda y: y.reshape((num_segments * seg_len, *y.shape[2:])),
                           outputs)
    if remainder:
        carry, rest = jax.lax.scan(step, carry, None, length=remainder)
        outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, rest)
    return carry, outputs


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
    of :func:`numpyro_hbmeta.infer.implicit_prior` needs βλ < 1, so a driver calls this once,
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



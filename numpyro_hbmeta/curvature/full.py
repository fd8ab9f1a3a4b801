"""The exact per-task Hessian C_j (tasks, d, d), by Cholesky: the Laplace evidence's curvature.

The Laplace evidence (Grant et al., ICLR 2018, eq. 4; MacKay 1992) needs log det C_j; the
Laplace task posterior needs solves and draws from N(0, C_j⁻¹). A block that is not positive
definite is never replaced: its log det is NaN and ``min_eigenvalue`` says by how much.

For small blocks (d ≤ ``SMALL_DIM``) the Cholesky factor and the triangular inverse are written
out entry by entry in ``jnp`` arithmetic (:func:`cholesky`, :func:`triangular_inverse`): every
entry is one elementwise operation over the tasks, which XLA fuses into a loop or two, where a
LAPACK call (a custom call per matrix batch, with its own derivative rule) costs far more than
the O(d³) arithmetic at d = 2 (``benchmarks/laplace_step.py``). Larger blocks use
:mod:`numpyro_hbmeta.curvature._linalg`. Both give NaN for the whole factor of a block that is
not positive definite, and both read only (C + Cᵀ)/2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature.base import TaskLoss, hessian_blocks

__all__ = ["SMALL_DIM", "FullCurvature", "cholesky", "full", "triangular_inverse"]

#: Largest block size whose factorisations are unrolled into elementwise jnp operations
#: (O(d³/6) of them in the trace: 120 multiply-adds at d = 8).
SMALL_DIM = 8


def _unrolled_cholesky(x: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor of symmetric (..., d, d) by the column (Cholesky–Banachiewicz)
    recurrence, one (...,)-shaped array per entry; NaN for every entry of a block whose
    pivot a_jj − Σ_k L_jk² is not > 0 (or NaN), as ``jnp.linalg.cholesky``."""
    d = x.shape[-1]
    a = [[x[..., i, j] for j in range(d)] for i in range(d)]
    low = [[None] * d for _ in range(d)]
    ok = None
    for j in range(d):
        pivot = a[j][j] - sum(low[j][k] * low[j][k] for k in range(j))
        good = pivot > 0
        ok = good if ok is None else ok & good
        # A safe argument, so the unselected branch has no NaN derivative either.
        diagonal = jnp.sqrt(jnp.where(good, pivot, 1.0))
        low[j][j] = diagonal
        for i in range(j + 1, d):
            low[i][j] = (a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))) / diagonal
    return _stack_lower(low, ok, x)


def _unrolled_triangular_inverse(lower: jnp.ndarray) -> jnp.ndarray:
    """L⁻¹ of lower-triangular (..., d, d) by forward substitution, entry by entry."""
    d = lower.shape[-1]
    low = [[lower[..., i, j] for j in range(i + 1)] for i in range(d)]
    inv = [[None] * d for _ in range(d)]
    for i in range(d):
        inv[i][i] = 1.0 / low[i][i]
        for j in range(i):
            inv[i][j] = -sum(low[i][k] * inv[k][j] for k in range(j, i)) / low[i][i]
    return _stack_lower(inv, None, lower)


def _stack_lower(entries, ok, like: jnp.ndarray) -> jnp.ndarray:
    d = like.shape[-1]
    zero = jnp.zeros(like.shape[:-2], like.dtype)
    out = jnp.stack([jnp.stack([entries[i][j] if j <= i else zero for j in range(d)], -1)
                     for i in range(d)], -2)
    return out if ok is None else jnp.where(ok[..., None, None], out, jnp.nan)


def cholesky(x: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor of (x + xᵀ)/2, (..., d, d); NaN where not positive definite.

    Unrolled into elementwise operations for d ≤ :data:`SMALL_DIM`, else
    :func:`numpyro_hbmeta.curvature._linalg.cholesky` (one LAPACK call per matrix on CPU)."""
    if x.shape[-1] > SMALL_DIM:
        return linalg.cholesky(x)
    return _unrolled_cholesky(0.5 * (x + jnp.swapaxes(x, -1, -2)))


def triangular_inverse(lower: jnp.ndarray) -> jnp.ndarray:
    """L⁻¹ of lower-triangular (..., d, d); unrolled for d ≤ :data:`SMALL_DIM` (as
    :func:`cholesky`)."""
    if lower.shape[-1] > SMALL_DIM:
        return linalg.triangular_inverse(lower)
    return _unrolled_triangular_inverse(lower)


def cholesky_solve(matrices: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """M_j⁻¹ r_j (..., d) by the Cholesky factor of M_j; NaN where M_j is not positive
    definite."""
    inv = triangular_inverse(cholesky(matrices))   # M⁻¹ = L⁻ᵀ L⁻¹
    if matrices.shape[-1] > SMALL_DIM:
        return jnp.einsum("...ki,...kl,...l->...i", inv, inv, rhs)
    # Products and sums XLA fuses with the factorisation (a batched dot of 2×2 blocks is not).
    half = jnp.sum(inv * rhs[..., None, :], -1)              # L⁻¹ r
    return jnp.sum(inv * half[..., :, None], -2)             # L⁻ᵀ L⁻¹ r


class FullCurvature(NamedTuple):
    """Dense per-task curvature C_j, shape (tasks, d, d)."""

    matrix: jnp.ndarray

    def _cholesky(self) -> jnp.ndarray:
        return cholesky(self.matrix)  # NaN where C_j is not positive definite

    def _inverse_cholesky(self) -> jnp.ndarray:
        return triangular_inverse(self._cholesky())  # L⁻¹, C⁻¹ = L⁻ᵀ L⁻¹

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


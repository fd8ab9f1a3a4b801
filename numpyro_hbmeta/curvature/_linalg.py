r"""Batched eigh and Cholesky that cannot deadlock XLA's CPU thread pool.

**Why this module exists.** jaxlib 0.10.0 to 0.11.x split a batched LAPACK call (``syevd``,
``potrf``, ``trsm``, ...) into chunks that they schedule on XLA's intra-op thread pool, and the
pool thread running the call then *blocks* until its chunks are done (``ParallelBatchMap`` in
``jaxlib/cpu/lapack_kernels.cc``, added for jax 0.10.0 and switched off again for open-source
builds after 0.11.0, jax commit 8599924, jax-ml/jax#36927). When as many such calls run at once
as the pool has threads, every thread waits for chunks that no free thread can run, and the
program hangs forever. K-FAC makes this likely: the eigendecompositions of the A and G factors
of every layer, each batched over tasks, are independent, so XLA runs them side by side; on a
2-core machine (a pool of two) LLAMA-K-FAC training hung every few hundred steps, with both
pool threads in ``lapack_ssyevd_ffi`` → ``absl::BlockingCounter::Wait``.

A LAPACK call on a *single* matrix never uses the pool, and neither does a batch too small for
jaxlib to split (batch × flops per matrix < 2·10⁵). So on CPU the functions here loop over a
large batch (``lax.map``), one unbatched LAPACK call per matrix — also under ``jax.vmap``,
whose batch axis a custom batching rule (:class:`jax.custom_batching.custom_vmap`) folds into
the batch of the call — and keep the native batched call for small batches. That is exactly
what the fixed jaxlib does inside its kernel (a loop over the batch), so nothing is lost
against it; on a 2-core machine it gives up jaxlib 0.10's split of one large batched call over
two threads (``benchmarks/cpu_linalg.py`` measures the ratio). On other platforms the functions
are ``jnp.linalg``'s, chosen at lowering time (:func:`jax.lax.platform_dependent`).

**Derivatives.** A sequential loop has no transpose rule, so each function carries its own
JVP whose tangent part is matrix products only (hence reverse mode, and forward-over-reverse
Hessians, work):

- eigh, A = V diag(w) Vᵀ: with M = Vᵀ dA V, dw = diag(M), dV = V (F ∘ M), F_ij = 1/(w_j − w_i)
  for i ≠ j and 0 on the diagonal (Magnus 1985; jax's own rule) — undefined for repeated
  eigenvalues, as jax's; K-FAC never differentiates it
  (:mod:`numpyro_hbmeta.curvature.kronecker` writes its derivatives in the eigenbases);
- Cholesky, A = L Lᵀ: dL = L Φ(L⁻¹ dA L⁻ᵀ), Φ = the lower triangle with the diagonal halved
  (Murray 2016, "Differentiation of the Cholesky decomposition", eq. 10);
- triangular inverse, X = L⁻¹: dX = −X dL X.

Inputs are symmetrised as ``jnp.linalg.eigh`` does, (A + Aᵀ)/2, and so are the tangents.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["cholesky", "eigh", "eigvalsh", "triangular_inverse"]


# jaxlib splits a batched call only when batch × cost ≥ 2·10⁵ flops, with cost ≤ 5n³ for the
# real kernels used here (syevd 5n³, potrf n³/3, trsm n³) and 3× that for complex ones
# (GetLapackBatchChunkSize in jaxlib/cpu/lapack_kernels.cc, jax 0.10). Below that the batched
# call runs inline on its thread and cannot deadlock, so it is kept: small problems (the
# statistical zoo models' d ≤ 5) pay neither the loop nor its compile time.
_SPLIT_FLOPS = 200_000
_FLOPS_PER_N3 = 15


def _chunk_size(size: int, n: int) -> int:
    """The most matrices per LAPACK call that jaxlib still runs inline (batch × cost below
    the split), among the divisors of ``size`` (equal chunks: one compiled call)."""
    most = max(1, (_SPLIT_FLOPS - 1) // (_FLOPS_PER_N3 * n**3))
    loops = next(m for m in range(-(-size // most), size + 1) if size % m == 0)
    return size // loops


def _one_matrix_at_a_time(fn: Callable) -> Callable:
    """``fn`` (batch-polymorphic in leading axes) with one LAPACK call per matrix on CPU."""

    def cpu(x):
        batch, n = x.shape[:-2], x.shape[-1]
        size = math.prod(batch)
        if size <= 1 or size * _FLOPS_PER_N3 * n**3 < _SPLIT_FLOPS:
            return fn(x)
        chunk = _chunk_size(size, n)
        if chunk == 1:
            out = jax.lax.map(fn, x.reshape((size, n, n)))
            return jax.tree.map(lambda o: o.reshape((*batch, *o.shape[1:])), out)
        # Matrix i = a·loops + b goes to chunk row a, loop step b: the chunk axis holds the
        # batch's contiguous blocks, so a batch split over devices (tasks sharded over a
        # mesh) stays split, each device calling LAPACK on its part of every chunk. With
        # (loops, chunk) the loop would run over the split axis, and XLA would all-gather the
        # batch and run the whole loop on every device.
        steps = jnp.swapaxes(x.reshape((chunk, size // chunk, n, n)), 0, 1)
        out = jax.lax.map(fn, steps)
        return jax.tree.map(
            lambda o: jnp.swapaxes(o, 0, 1).reshape((*batch, *o.shape[2:])), out)

    @jax.custom_batching.custom_vmap
    def call(x):
        return jax.lax.platform_dependent(x, cpu=cpu, default=fn)

    @call.def_vmap
    def _vmap_rule(axis_size, in_batched, x):
        # The vmapped axis is x's leading axis: fold it into the batch of the call itself.
        out = call(x)
        return out, jax.tree.map(lambda _: in_batched[0], out)

    return call


def _symmetric(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


_eigh = _one_matrix_at_a_time(lambda x: tuple(jnp.linalg.eigh(x, symmetrize_input=False)))
_cholesky = _one_matrix_at_a_time(lambda x: jnp.linalg.cholesky(x, symmetrize_input=False))
_tril_inverse = _one_matrix_at_a_time(lambda x: jax.scipy.linalg.solve_triangular(
    x, jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape), lower=True))


@jax.custom_jvp
def eigh(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of symmetric matrices (..., n, n).

    The same numbers as ``jnp.linalg.eigh``; on CPU one LAPACK call per matrix (module
    docstring).

    Args:
        x: symmetric matrices, shape (..., n, n); only (x + xᵀ)/2 is used.

    Returns:
        ``(w, v)``: eigenvalues (..., n) and orthonormal eigenvectors as the columns of
        v (..., n, n), x = v diag(w) vᵀ.

    Examples:
        >>> import jax.numpy as jnp
        >>> w, v = eigh(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
        >>> [round(float(e), 6) for e in w]
        [1.0, 3.0]
    """
    return _eigh(_symmetric(x))


@eigh.defjvp
def _eigh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    w, v = eigh(x)
    m = jnp.swapaxes(v, -1, -2) @ _symmetric(dx) @ v
    gap = w[..., None, :] - w[..., :, None]  # w_j − w_i
    off = ~jnp.eye(w.shape[-1], dtype=bool)
    f = jnp.where(off, 1.0 / jnp.where(off, gap, 1.0), 0.0)
    return (w, v), (jnp.diagonal(m, axis1=-2, axis2=-1), v @ (f * m))


def eigvalsh(x: jnp.ndarray) -> jnp.ndarray:
    """Eigenvalues (ascending) of symmetric matrices (..., n, n); see :func:`eigh`."""
    return eigh(x)[0]


@jax.custom_jvp
def triangular_inverse(lower: jnp.ndarray) -> jnp.ndarray:
    """L⁻¹ for lower-triangular L (..., n, n); on CPU one LAPACK call per matrix.

    Args:
        lower: lower-triangular matrices (..., n, n) with non-zero diagonals.

    Examples:
        >>> import jax.numpy as jnp
        >>> triangular_inverse(jnp.array([[2.0, 0.0], [1.0, 1.0]])).tolist()
        [[0.5, 0.0], [-0.5, 1.0]]
    """
    return _tril_inverse(lower)


@triangular_inverse.defjvp
def _triangular_inverse_jvp(primals, tangents):
    (lower,), (dlower,) = primals, tangents
    inv = triangular_inverse(lower)
    return inv, -inv @ jnp.tril(dlower) @ inv


@jax.custom_jvp
def cholesky(x: jnp.ndarray) -> jnp.ndarray:
    """Lower Cholesky factor L of symmetric positive-definite matrices, x = L Lᵀ.

    The same numbers as ``jnp.linalg.cholesky`` (NaN where a matrix is not positive
    definite); on CPU one LAPACK call per matrix (module docstring).

    Args:
        x: shape (..., n, n); only (x + xᵀ)/2 is used.

    Examples:
        >>> import jax.numpy as jnp
        >>> cholesky(jnp.array([[4.0, 2.0], [2.0, 2.0]])).tolist()
        [[2.0, 0.0], [1.0, 1.0]]
    """
    return _cholesky(_symmetric(x))


@cholesky.defjvp
def _cholesky_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    lower = cholesky(x)
    inv = triangular_inverse(lower)
    inner = inv @ _symmetric(dx) @ jnp.swapaxes(inv, -1, -2)
    phi = jnp.tril(inner) - 0.5 * jnp.eye(x.shape[-1], dtype=inner.dtype) * inner
    return lower, lower @ phi

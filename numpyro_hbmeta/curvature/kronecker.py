r"""Kronecker-factored curvature of dense layers (K-FAC), with log det, solve and sample.

K-FAC (Martens & Grosse 2015, §3) approximates the Fisher block of one dense layer y = W̄ᵀ ā,
ā = [a; 1] the input with a bias entry appended, by a Kronecker product

    F = Σ_n E_ỹ[(ā_n ⊗ g_n)(ā_n ⊗ g_n)ᵀ] ≈ A ⊗ G,
    A = (1/n) Σ_n ā_n ā_nᵀ   (p × p, p = d_in + 1),
    G = Σ_n g_n g_nᵀ         (q × q, q = d_out),

where g_n = ∂(−log p(ỹ_n | f_n))/∂y_n is the gradient of the loss w.r.t. the layer's
pre-activation (its output) for one point. Ritter, Botev & Barber (ICLR 2018) use the same
blocks as a Laplace posterior precision, and LLAMA (Grant et al., ICLR 2018, §4) uses
log det of it as its penalty.

**Vectorisation.** Weights and bias of a layer form W̄ = [W; b] of shape (p, q) = (d_in+1, d_out),
and a block acts on the *row-major* vectorisation vec(W̄)[i·q + j] = W̄[i, j], i.e. what
``W̄.reshape(-1)`` gives (:func:`numpyro_hbmeta.nn.vec.vec_dense`). With that convention
∂ℓ/∂vec(W̄) = ā ⊗ g (``jnp.kron(a_bar, g)``), so the block is A ⊗ G with A first, ``to_dense``
is ``jnp.kron(A, G)``, and (A ⊗ G) vec(X) = vec(A X Gᵀ). (The column-major convention of
Martens & Grosse gives G ⊗ A for the same matrix.) Several layers are concatenated in layer
order (:class:`KFACCurvature`, :func:`numpyro_hbmeta.nn.vec.vec_mlp`).

**Normalisation.** The curvature of a *sum* of n per-point losses is n times an average;
K-FAC replaces E[ā āᵀ ⊗ g gᵀ] by E[ā āᵀ] ⊗ E[g gᵀ] (inputs and output gradients assumed independent,
Martens & Grosse 2015, §3), so F ≈ n E[ā āᵀ] ⊗ E[g gᵀ]. The statistics
(:meth:`numpyro_hbmeta.curvature.kfac.LayerPoints.factor`) put the n into G (A is a mean, G a sum);
only the product matters for every function here. K-FAC is exact for a single layer whose per-point
output Fisher E[g gᵀ] is the same for all points (e.g. a linear-Gaussian regression), and for any
layer when n = 1.

**True Fisher, not the empirical one.** g_n must come from targets ỹ_n *sampled* from the
model's predictive (:mod:`numpyro_hbmeta.marginal.fisher` draws them), not from the observed
targets. Then E_ỹ[g gᵀ] is the output Fisher Λ_n and the block approximates the
generalised Gauss–Newton Σ_n J_nᵀ Λ_n J_n, which is positive semi-definite and equals the Fisher
for exponential families with canonical link (Martens 2020, §9). The "empirical Fisher" from
observed targets is not a curvature approximation in general (Kunstner et al., NeurIPS 2019).
Where Λ_n has a known square root the expectation can be taken exactly instead of sampled:
for one Gaussian output unit, g_n = 1/σ.

**Damping and non-PSD factors.** Every function works through the eigendecompositions
A = U_A diag(a) U_Aᵀ and G = U_G diag(g) U_Gᵀ: A ⊗ G + δI = (U_A ⊗ U_G) diag(a_i g_j + δ)
(U_A ⊗ U_G)ᵀ, so the cost per task is O(p³ + q³) (plus O(pq(p + q)) to apply), and no pq × pq
matrix is formed outside :func:`to_dense`. A and G are second moments, hence PSD; eigenvalues in
[−τ, 0) with τ = 10·dim·ε·max|eigenvalue| are roundoff and are set to 0. An eigenvalue below −τ
is reported, never clipped: that task's log det, solve and samples are NaN (traced code cannot
raise), and :func:`min_eigenvalues` says by how much. With δ = 0 a singular factor gives
log det = −inf and infinite solves.

**Gradients.** eigh's derivative is undefined for repeated eigenvalues, which A has whenever
a task has fewer points than inputs. :func:`logdet`, :func:`solve` and
:func:`inverse_sqrt_matvec` therefore carry their own JVPs, written in the eigenbases, whose
first derivatives are exact and finite for any PSD spectrum (d log det = Σ_ij (ã_i g_j +
a_i g̃_j + dδ)/(a_i g_j + δ) with ã = diag(U_Aᵀ dA U_A); Daleckii–Krein divided differences for
the square root).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature import _linalg as linalg

__all__ = [
    "KFACCurvature",
    "KroneckerFactor",
    "inverse_sqrt_matvec",
    "kron_min_eigenvalue",
    "logdet",
    "matvec",
    "min_eigenvalues",
    "sample",
    "solve",
    "to_dense",
]

_ROUNDOFF = 10.0


class KroneckerFactor(NamedTuple):
    """One layer's curvature block A ⊗ G, batched over leading (task) axes.

    Attributes:
        A: input second moment, shape (..., p, p), p = d_in + 1.
        G: output-gradient second moment (summed over points), shape (..., q, q), q = d_out.
    """

    A: jnp.ndarray
    G: jnp.ndarray

    def spectrum(self) -> _Spectrum:
        """Eigendecompositions A = U_A diag(a) U_Aᵀ, G = U_G diag(g) U_Gᵀ (batched), once.

        The block A ⊗ G + δI has eigenvalues a_i g_j + δ and eigenvectors U_A ⊗ U_G, so a
        caller that keeps this spectrum can solve, sample and take log dets of any spectral
        function of the block at O(pq(p + q)) per task without another eigh (the task
        posterior, :mod:`numpyro_hbmeta.infer.posterior`). Eigenvalues in [−τ, 0) are roundoff
        and set to 0 (module docstring); ``nan_mask`` is NaN for a task whose A or G has an
        eigenvalue below −τ. No custom derivative: do not differentiate through it when
        eigenvalues repeat.

        Returns:
            ``(a, u_a, g, u_g, nan_mask)`` with shapes (..., p), (..., p, p), (..., q),
            (..., q, q), (...).
        """
        A, G, _ = _broadcast(self, 0.0)
        return _spectrum(A, G)


# --------------------------------------------------------------------------- spectra


def _standard_normal(rng_key: jax.Array, shape: tuple[int, ...], dtype) -> jnp.ndarray:
    # Drawn flat and reshaped: XLA compiles multi-dimensional threefry far more slowly.
    return jax.random.normal(rng_key, (math.prod(shape),), dtype).reshape(shape)



class _Spectrum(NamedTuple):
    a: jnp.ndarray  # (..., p) eigenvalues of A, roundoff negatives set to 0
    u_a: jnp.ndarray  # (..., p, p)
    g: jnp.ndarray  # (..., q)
    u_g: jnp.ndarray  # (..., q, q)
    nan_mask: jnp.ndarray  # (...) 1 where both factors are PSD up to roundoff, NaN otherwise


def _checked_eigh(matrix: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    values, vectors = linalg.eigh(matrix)
    scale = jnp.max(jnp.abs(values), -1, keepdims=True)
    tol = _ROUNDOFF * matrix.shape[-1] * jnp.finfo(values.dtype).eps * scale
    valid = jnp.all(values >= -tol, -1)
    return jnp.where(values < 0, jnp.where(values >= -tol, 0.0, values), values), vectors, valid


def _spectrum(A: jnp.ndarray, G: jnp.ndarray) -> _Spectrum:
    a, u_a, valid_a = _checked_eigh(A)
    g, u_g, valid_g = _checked_eigh(G)
    nan_mask = jnp.where(valid_a & valid_g, 1.0, jnp.nan).astype(a.dtype)
    return _Spectrum(a, u_a, g, u_g, nan_mask)


def _eigenvalues(spec: _Spectrum, damping: jnp.ndarray) -> jnp.ndarray:
    """λ_ij = a_i g_j + δ, (..., p, q): the spectrum of A ⊗ G + δI in row-major order."""
    return spec.a[..., :, None] * spec.g[..., None, :] + damping[..., None, None]


def _rotate(spec: _Spectrum, X: jnp.ndarray) -> jnp.ndarray:
    """(U_A ⊗ U_G)ᵀ vec(X) as a matrix: U_Aᵀ X U_G."""
    return jnp.swapaxes(spec.u_a, -1, -2) @ X @ spec.u_g


def _unrotate(spec: _Spectrum, X: jnp.ndarray) -> jnp.ndarray:
    """(U_A ⊗ U_G) vec(X) as a matrix: U_A X U_Gᵀ."""
    return spec.u_a @ X @ jnp.swapaxes(spec.u_g, -1, -2)


def _broadcast(factor: KroneckerFactor, damping: Any) -> tuple[jnp.ndarray, ...]:
    A, G = jnp.asarray(factor.A), jnp.asarray(factor.G)
    if A.ndim < 2 or G.ndim < 2 or A.shape[-1] != A.shape[-2] or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"KroneckerFactor: expected A (..., p, p) and G (..., q, q), "
                         f"got {A.shape} and {G.shape}")
    dtype = jnp.result_type(A, G)
    batch = jnp.broadcast_shapes(A.shape[:-2], G.shape[:-2], jnp.shape(damping))
    A = jnp.broadcast_to(A.astype(dtype), (*batch, *A.shape[-2:]))
    G = jnp.broadcast_to(G.astype(dtype), (*batch, *G.shape[-2:]))
    return A, G, jnp.broadcast_to(jnp.asarray(damping, dtype), batch)


def _as_matrix(v: jnp.ndarray, p: int, q: int, name: str) -> jnp.ndarray:
    if v.shape[-1:] != (p * q,):
        raise ValueError(f"{name}: expected vectors (..., {p * q}) = (..., {p}·{q}), "
                         f"got {v.shape}")
    return v.reshape((*v.shape[:-1], p, q))


def min_eigenvalues(factor: KroneckerFactor) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Smallest eigenvalues of A and of G, each (...); a diagnostic (no gradient)."""
    A, G = jax.lax.stop_gradient((factor.A, factor.G))
    return linalg.eigvalsh(A)[..., 0], linalg.eigvalsh(G)[..., 0]


def kron_min_eigenvalue(factor: KroneckerFactor) -> jnp.ndarray:
    """Smallest eigenvalue of A ⊗ G, (...); a diagnostic (no gradient).

    The spectrum of A ⊗ G is {a_i g_j}, so its minimum is the least of the four products of
    the extreme eigenvalues of A and G (either factor may have negative eigenvalues).
    """
    A, G = jax.lax.stop_gradient((factor.A, factor.G))
    a, g = linalg.eigvalsh(A), linalg.eigvalsh(G)
    ends = jnp.stack([a[..., 0] * g[..., 0], a[..., 0] * g[..., -1],
                      a[..., -1] * g[..., 0], a[..., -1] * g[..., -1]])
    return jnp.min(ends, 0)


# --------------------------------------------------------------------------- log det


@jax.jit
def logdet(factor: KroneckerFactor, damping: float | jnp.ndarray = 0.0) -> jnp.ndarray:
    """log det(A ⊗ G + δI) = Σ_{i,j} log(a_i g_j + δ), from eigh of A and G.

    For δ = 0 this is q log det A + p log det G.

    Args:
        factor: a :class:`KroneckerFactor` with batch shape (...).
        damping: δ ≥ 0, scalar or (...).

    Returns:
        Shape (...); NaN where A or G has an eigenvalue below −roundoff.

    Examples:
        >>> import jax.numpy as jnp
        >>> f = KroneckerFactor(jnp.diag(jnp.array([1.0, 2.0])), jnp.array([[3.0]]))
        >>> round(float(logdet(f, 1.0)), 4)  # log(1·3 + 1) + log(2·3 + 1)
        3.3322
    """
    return _logdet(*_broadcast(factor, damping))


@jax.custom_jvp
def _logdet(A: jnp.ndarray, G: jnp.ndarray, damping: jnp.ndarray) -> jnp.ndarray:
    spec = _spectrum(A, G)
    return jnp.sum(jnp.log(_eigenvalues(spec, damping)), (-2, -1)) * spec.nan_mask


@_logdet.defjvp
def _logdet_jvp(primals, tangents):
    A, G, damping = primals
    dA, dG, ddamping = tangents
    spec = _spectrum(A, G)
    lam = _eigenvalues(spec, damping)
    # d log det M = tr(M⁻¹ dM); in the eigenbasis only the diagonals of the rotated
    # perturbations enter, so repeated eigenvalues are harmless.
    da = jnp.einsum("...ki,...kl,...li->...i", spec.u_a, dA, spec.u_a)
    dg = jnp.einsum("...ki,...kl,...li->...i", spec.u_g, dG, spec.u_g)
    dlam = (da[..., :, None] * spec.g[..., None, :] + spec.a[..., :, None] * dg[..., None, :]
            + ddamping[..., None, None])
    out = jnp.sum(jnp.log(lam), (-2, -1)) * spec.nan_mask
    return out, jnp.sum(dlam / lam, (-2, -1)) * spec.nan_mask


# --------------------------------------------------------------------------- solve


@jax.jit
def matvec(factor: KroneckerFactor, v: jnp.ndarray) -> jnp.ndarray:
    """(A ⊗ G) v = vec(A V Gᵀ) for v of shape (..., p·q) (row-major V = v.reshape(p, q))."""
    A, G, _ = _broadcast(factor, 0.0)
    V = _as_matrix(v, A.shape[-1], G.shape[-1], "matvec")
    return (A @ V @ jnp.swapaxes(G, -1, -2)).reshape(v.shape)


@jax.jit
def solve(factor: KroneckerFactor, v: jnp.ndarray,
          damping: float | jnp.ndarray = 0.0) -> jnp.ndarray:
    """(A ⊗ G + δI)⁻¹ v = vec(U_A [(U_Aᵀ V U_G) ⊘ (a gᵀ + δ)] U_Gᵀ).

    Args:
        factor: batch shape (...).
        v: shape (..., p·q), row-major vec (see the module docstring); its batch axes
            broadcast against the factor's.
        damping: δ, scalar or (...).

    Returns:
        Shape of ``v`` broadcast with the batch; NaN for tasks with a non-PSD factor.
    """
    A, G, damping = _broadcast(factor, damping)
    V = _as_matrix(v, A.shape[-1], G.shape[-1], "solve")
    X = _solve(A, G, damping, V)
    return X.reshape((*X.shape[:-2], -1))


def _solve_spectrum(spec: _Spectrum, damping: jnp.ndarray, V: jnp.ndarray) -> jnp.ndarray:
    X = _unrotate(spec, _rotate(spec, V) / _eigenvalues(spec, damping))
    return X * spec.nan_mask[..., None, None]


@jax.custom_jvp
def _solve(A, G, damping, V):
    return _solve_spectrum(_spectrum(A, G), damping, V)


@_solve.defjvp
def _solve_jvp(primals, tangents):
    A, G, damping, V = primals
    dA, dG, ddamping, dV = tangents
    spec = _spectrum(A, G)
    X = _solve_spectrum(spec, damping, V)
    # M X = V  ⇒  dX = M⁻¹(dV − dM X), with (dA ⊗ G + A ⊗ dG + dδ I) vec X
    # = vec(dA X Gᵀ + A X dGᵀ + dδ X).
    dM_X = (dA @ X @ jnp.swapaxes(G, -1, -2) + A @ X @ jnp.swapaxes(dG, -1, -2)
            + ddamping[..., None, None] * X)
    return X, _solve_spectrum(spec, damping, dV - dM_X)


# --------------------------------------------------------------------------- sampling


@jax.jit
def inverse_sqrt_matvec(factor: KroneckerFactor, z: jnp.ndarray,
                        damping: float | jnp.ndarray = 0.0) -> jnp.ndarray:
    """(A ⊗ G + δI)^(−1/2) z with the symmetric square root.

    M^(−1/2) = (U_A ⊗ U_G) diag(λ)^(−1/2) (U_A ⊗ U_G)ᵀ, λ_ij = a_i g_j + δ. The symmetric root
    (rather than (U_A ⊗ U_G) diag(λ)^(−1/2)) makes the result a smooth function of (A, G, δ)
    that does not depend on eigh's choice of eigenvectors, so reparameterised samples have
    well-defined gradients (their JVP costs O(pq(p + q)) time and memory per vector).

    Args:
        factor: batch shape (...).
        z: shape (..., p·q), broadcasting against the batch.
        damping: δ, scalar or (...).
    """
    A, G, damping = _broadcast(factor, damping)
    Z = _as_matrix(z, A.shape[-1], G.shape[-1], "inverse_sqrt_matvec")
    X = _inverse_sqrt(A, G, damping, Z)
    return X.reshape((*X.shape[:-2], -1))


def _inverse_sqrt_spectrum(spec: _Spectrum, damping: jnp.ndarray, Z: jnp.ndarray) -> jnp.ndarray:
    root = jnp.sqrt(_eigenvalues(spec, damping))
    return _unrotate(spec, _rotate(spec, Z) / root) * spec.nan_mask[..., None, None]


@jax.custom_jvp
def _inverse_sqrt(A, G, damping, Z):
    return _inverse_sqrt_spectrum(_spectrum(A, G), damping, Z)


@_inverse_sqrt.defjvp
def _inverse_sqrt_jvp(primals, tangents):
    A, G, damping, Z = primals
    dA, dG, ddamping, dZ = tangents
    spec = _spectrum(A, G)
    root = jnp.sqrt(_eigenvalues(spec, damping))  # s_ij
    Zr = _rotate(spec, Z)
    dA_r = jnp.swapaxes(spec.u_a, -1, -2) @ dA @ spec.u_a
    dG_r = jnp.swapaxes(spec.u_g, -1, -2) @ dG @ spec.u_g

    def divided(s, t):
        # (f(x) − f(y))/(x − y) for f = x^(−1/2), x = s², y = t²; equals f'(x) when s = t.
        return -1.0 / (s * t * (s + t))

    # Daleckii–Krein: d f(M)[E] = Q (F ∘ QᵀEQ) Qᵀ with Q = U_A ⊗ U_G and
    # QᵀEQ = dA_r ⊗ diag(g) + diag(a) ⊗ dG_r + dδ I.
    in_a = divided(root[..., :, None, :], root[..., None, :, :])  # (..., i, k, j)
    in_g = divided(root[..., :, :, None], root[..., :, None, :])  # (..., i, j, l)
    Y = (spec.g[..., None, :] * jnp.einsum("...ikj,...ik,...kj->...ij", in_a, dA_r, Zr)
         + spec.a[..., :, None] * jnp.einsum("...ijl,...jl,...il->...ij", in_g, dG_r, Zr)
         + ddamping[..., None, None] * divided(root, root) * Zr)
    dX = _unrotate(spec, Y) * spec.nan_mask[..., None, None]
    out = _inverse_sqrt_spectrum(spec, damping, Z)
    return out, dX + _inverse_sqrt_spectrum(spec, damping, dZ)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def sample(rng_key: jax.Array, factor: KroneckerFactor, damping: float | jnp.ndarray = 0.0,
           num_samples: int = 1) -> jnp.ndarray:
    """Draws from N(0, (A ⊗ G + δI)⁻¹), shape (num_samples, ..., p·q) in row-major vec.

    x = M^(−1/2) z with z ~ N(0, I) (:func:`inverse_sqrt_matvec`), so Cov x = M⁻¹ exactly.
    Ritter et al. (ICLR 2018) sample the Kronecker-factored Laplace posterior as a matrix
    normal, with the damping added to each factor, (A + √δ I) ⊗ (G + √δ I); working in the
    eigenbases gives the exactly damped A ⊗ G + δI at the same cost.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"kfac.sample: num_samples must be a positive integer, "
                         f"got {num_samples!r}")
    A, G, damping = _broadcast(factor, damping)
    p, q = A.shape[-1], G.shape[-1]
    z = _standard_normal(rng_key, (num_samples, *A.shape[:-2], p * q), A.dtype)
    return inverse_sqrt_matvec(KroneckerFactor(A, G), z, damping)


@jax.jit
def to_dense(factor: KroneckerFactor, damping: float | jnp.ndarray = 0.0) -> jnp.ndarray:
    """The dense A ⊗ G + δI, shape (..., p·q, p·q); for tests and small checks only."""
    A, G, damping = _broadcast(factor, damping)
    p, q = A.shape[-1], G.shape[-1]
    kron = jnp.einsum("...ik,...jl->...ijkl", A, G).reshape((*A.shape[:-2], p * q, p * q))
    return kron + damping[..., None, None] * jnp.eye(p * q, dtype=kron.dtype)


# --------------------------------------------------------------------------- several layers


class KFACCurvature(NamedTuple):
    """Block-diagonal K-FAC curvature of several layers, ⊕_l (A_l ⊗ G_l + δI).

    The same interface as :class:`numpyro_hbmeta.curvature.FullCurvature` (``logdet``,
    ``solve``, ``sample``, ``min_eigenvalue``, ``dense``) on vectors that concatenate each
    layer's row-major vec(W̄_l) in layer order (:func:`vec_mlp`).

    Attributes:
        factors: one :class:`KroneckerFactor` per layer, all with batch shape (tasks,).
        damping: δ, scalar or (tasks,).
    """

    factors: tuple[KroneckerFactor, ...]
    damping: Any = 0.0

    def _sizes(self) -> list[int]:
        return [f.A.shape[-1] * f.G.shape[-1] for f in self.factors]

    def _split(self, v: jnp.ndarray) -> list[jnp.ndarray]:
        if v.shape[-1] != sum(self._sizes()):
            raise ValueError(f"KFACCurvature: expected vectors (..., {sum(self._sizes())}), "
                             f"got {v.shape}")
        return jnp.split(v, np.cumsum(self._sizes()[:-1]).tolist(), axis=-1)

    def logdet(self) -> jnp.ndarray:
        """Σ_l log det(A_l ⊗ G_l + δI), (tasks,)."""
        return sum(logdet(f, self.damping) for f in self.factors)

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        """Block-wise (A_l ⊗ G_l + δI)⁻¹ v_l, v of shape (tasks, d)."""
        return jnp.concatenate([solve(f, part, self.damping)
                                for f, part in zip(self.factors, self._split(v), strict=True)],
                               axis=-1)

    def sample(self, rng_key: jax.Array, num_samples: int) -> jnp.ndarray:
        """Draws from N(0, curvature⁻¹), shape (num_samples, tasks, d)."""
        keys = jax.random.split(rng_key, len(self.factors))
        return jnp.concatenate([sample(key, f, self.damping, num_samples)
                                for key, f in zip(keys, self.factors, strict=True)], axis=-1)

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue of the damped block-diagonal matrix per task (diagnostic)."""
        lowest = jnp.stack([kron_min_eigenvalue(f) for f in self.factors])
        return jnp.min(lowest, 0) + jax.lax.stop_gradient(self.damping)

    def dense(self) -> jnp.ndarray:
        """The dense (tasks, d, d) matrix; for tests only."""
        blocks = [to_dense(f, self.damping) for f in self.factors]
        batch = jnp.broadcast_shapes(*(b.shape[:-2] for b in blocks))
        flat = [jnp.broadcast_to(b, (*batch, *b.shape[-2:])).reshape((-1, *b.shape[-2:]))
                for b in blocks]
        dense = jax.vmap(jax.scipy.linalg.block_diag)(*flat)
        return dense.reshape((*batch, *dense.shape[-2:]))

"""K-FAC per task, ⊕_l (A_l ⊗ G_l + δI), on Φ's layout: LLAMA's curvature.

One Kronecker block per :func:`~numpyro_hbmeta.nn.layers.dense_layer` whose weights are task
parameters (Martens & Grosse 2015, §3; Grant et al., ICLR 2018, §4). The statistics come from
re-running the model (:mod:`numpyro_hbmeta.marginal.fisher`); the Kronecker algebra is in
:mod:`numpyro_hbmeta.curvature.kronecker`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.curvature.base import Observations, TaskLoss, check_damping, need_observations
from numpyro_hbmeta.curvature.kronecker import KFACCurvature, KroneckerFactor, kron_min_eigenvalue
from numpyro_hbmeta.curvature.kronecker import logdet as kfac_logdet

__all__ = ["KFAC", "KFACTaskCurvature", "LayerPoints", "PermutedCurvature"]


class PermutedCurvature(NamedTuple):
    """A curvature that acts on the parameters in another order (K-FAC's layer-wise vec).

    Attributes:
        curvature: acts on u with u[i] = v[order[i]], v in the layout of Φ.
        order: (d,) integer array, a permutation of the columns of Φ.
    """

    curvature: Any
    order: np.ndarray

    @property
    def _inverse(self) -> np.ndarray:
        return np.argsort(self.order)

    def logdet(self) -> jnp.ndarray:
        return self.curvature.logdet()

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return self.curvature.solve(v[..., self.order])[..., self._inverse]

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        return self.curvature.sample(rng_key, num_samples)[..., self._inverse]

    def min_eigenvalue(self) -> jnp.ndarray:
        return self.curvature.min_eigenvalue()

    def dense(self) -> jnp.ndarray:
        inverse = self._inverse
        return self.curvature.dense()[..., inverse, :][..., :, inverse]


class LayerPoints(NamedTuple):
    """One dense layer's K-FAC statistics, point by point
    (:mod:`numpyro_hbmeta.curvature.kronecker`).

    Attributes:
        inputs: ā, the layer inputs with the bias entry appended, restricted to the rows of
            W̄ = [W; b] that are task parameters, (tasks, n, p).
        output_grads: g, per-point gradients of the sampled-target loss w.r.t. the layer's
            pre-activation, (tasks, n, q).
    """

    inputs: jnp.ndarray
    output_grads: jnp.ndarray

    def factor(self) -> KroneckerFactor:
        """A = (1/n) Σ ā āᵀ (p × p), G = Σ g gᵀ (q × q), as :func:`kfac.dense_factors`."""
        a, g = self.inputs, self.output_grads
        return KroneckerFactor(jnp.einsum("tni,tnj->tij", a, a) / a.shape[-2],
                               jnp.einsum("tni,tnj->tij", g, g))

    def compact_factor(self) -> KroneckerFactor:
        """Factors with the same non-zero spectra, each of size min(n, p) and min(n, q).

        A = ĀᵀĀ/n and Ā Āᵀ/n share their non-zero eigenvalues (likewise G), so with fewer
        points than inputs the n × n Gram matrices carry the whole log det at a fraction of
        the cost of p × p eigendecompositions.
        """
        a, g = self.inputs, self.output_grads
        n, p, q = a.shape[-2], a.shape[-1], g.shape[-1]
        full = self.factor()
        A = jnp.einsum("tni,tmi->tnm", a, a) / n if n < p else full.A
        G = jnp.einsum("tni,tmi->tnm", g, g) if n < q else full.G
        return KroneckerFactor(A, G)


class KFACTaskCurvature(NamedTuple):
    """K-FAC per task, ⊕_l (A_l ⊗ G_l + δI), on Φ's layout.

    ``logdet`` and ``min_eigenvalue`` work on the compact factors
    (:meth:`LayerPoints.compact_factor`): every eigenvalue of A_l ⊗ G_l missing from them is
    zero, so log det = Σ_l [log det(Ã_l ⊗ G̃_l + δI) + (p_l q_l − p̃_l q̃_l) log δ]. ``solve``,
    ``sample`` and ``dense`` use the full factors (:class:`kfac.KFACCurvature`).

    Attributes:
        layers: one :class:`LayerPoints` per layer, in K-FAC order.
        order: (d,) the column of Φ at each position of the concatenated K-FAC vec.
        damping: δ.
    """

    layers: tuple[LayerPoints, ...]
    order: np.ndarray
    damping: Any = 0.0

    def _full(self) -> PermutedCurvature:
        factors = tuple(layer.factor() for layer in self.layers)
        return PermutedCurvature(KFACCurvature(factors, self.damping), self.order)

    def _missing(self, layer: LayerPoints, compact: KroneckerFactor) -> int:
        p, q = layer.inputs.shape[-1], layer.output_grads.shape[-1]
        return p * q - compact.A.shape[-1] * compact.G.shape[-1]

    def logdet(self) -> jnp.ndarray:
        """Σ_l log det(A_l ⊗ G_l + δI), (tasks,); NaN where a factor is not PSD."""
        total = 0.0
        for layer in self.layers:
            compact = layer.compact_factor()
            total = total + kfac_logdet(compact, self.damping)
            missing = self._missing(layer, compact)
            if missing:
                total = total + missing * jnp.log(jnp.asarray(self.damping,
                                                              compact.A.dtype))
        return total

    def min_eigenvalue(self) -> jnp.ndarray:
        """Smallest eigenvalue per task, δ plus the smallest product a_i g_j (zero when a
        factor is rank deficient); a diagnostic, no gradient."""
        lowest = []
        for layer in self.layers:
            compact = jax.lax.stop_gradient(layer.compact_factor())
            low = kron_min_eigenvalue(compact)
            lowest.append(jnp.minimum(low, 0.0) if self._missing(layer, compact) else low)
        return jnp.min(jnp.stack(lowest), 0) + self.damping

    def solve(self, v: jnp.ndarray) -> jnp.ndarray:
        return self._full().solve(v)

    def sample(self, rng_key: jnp.ndarray, num_samples: int) -> jnp.ndarray:
        return self._full().sample(rng_key, num_samples)

    def dense(self) -> jnp.ndarray:
        return self._full().dense()



@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC Fisher of the task negative log-likelihood, ⊕_l (A_l ⊗ G_l + δI), in Φ's layout.

    One Kronecker block per :func:`~numpyro_hbmeta.nn.layers.dense_layer` whose weights are
    task parameters (Martens & Grosse 2015, §3; the curvature of LLAMA, Grant et al., ICLR
    2018, §4); every task parameter must be in exactly one such layer. Output gradients are
    taken at targets sampled from the model's predictive with a fixed key (``seed``) folded
    with the task index, so the objective is a deterministic function of the globals; for
    a Normal likelihood with one output per point, G is the exact expectation
    (:mod:`numpyro_hbmeta.marginal.fisher`).

    Args:
        damping: δ added to every block, independent of η.
        seed: the fixed PRNG seed of the sampled targets.
    """

    damping: float = 1e-3
    seed: int = 0
    likelihood_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_damping("KFAC", self.damping)

    def __call__(self, loss: TaskLoss, phi: jnp.ndarray,
                 observations: Observations | None = None) -> KFACTaskCurvature:
        observations = need_observations("kfac", observations)
        layers, order = observations.kfac_statistics(phi, jax.random.PRNGKey(self.seed))
        return KFACTaskCurvature(layers, order, self.damping)



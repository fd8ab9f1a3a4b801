"""K-FAC's vectorisation of dense-layer weights: row-major vec of W̄ = [W; b].

A layer's weights and bias form W̄ = [W; b] of shape (p, q) = (d_in+1, d_out), and a K-FAC block
A ⊗ G acts on vec(W̄)[i·q + j] = W̄[i, j], what ``W̄.reshape(-1)`` gives
(:mod:`numpyro_hbmeta.curvature.kronecker`). Several layers concatenate in layer order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from numpyro_hbmeta.nn.networks import mlp_sizes

__all__ = ["unvec_dense", "unvec_mlp", "vec_dense", "vec_mlp"]

def vec_dense(layer: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """Row-major vec of W̄ = [W; b]: (..., (d_in+1)·d_out), the order a block acts on.

    Args:
        layer: ``{"w": (..., d_in, d_out), "b": (..., d_out)}`` as in
            :mod:`numpyro_hbmeta.nn.networks`.
    """
    w_bar = jnp.concatenate([layer["w"], layer["b"][..., None, :]], axis=-2)
    return w_bar.reshape((*w_bar.shape[:-2], -1))


def unvec_dense(v: jnp.ndarray, d_in: int, d_out: int) -> dict[str, jnp.ndarray]:
    """Inverse of :func:`vec_dense`: (..., (d_in+1)·d_out) -> ``{"w", "b"}``."""
    if v.shape[-1] != (d_in + 1) * d_out:
        raise ValueError(f"unvec_dense: expected (..., {(d_in + 1) * d_out}), got {v.shape}")
    w_bar = v.reshape((*v.shape[:-1], d_in + 1, d_out))
    return {"w": w_bar[..., :-1, :], "b": w_bar[..., -1, :]}


def vec_mlp(params: dict[str, Any]) -> jnp.ndarray:
    """Concatenation of :func:`vec_dense` over an MLP's layers, in layer order."""
    num_layers = len(mlp_sizes(params)) - 1
    return jnp.concatenate([vec_dense(params[f"dense_{layer}"])
                            for layer in range(num_layers)], axis=-1)


def unvec_mlp(v: jnp.ndarray, sizes: Sequence[int]) -> dict[str, Any]:
    """Inverse of :func:`vec_mlp` for layer widths ``sizes`` = (d_0, ..., d_L)."""
    counts = [(sizes[layer] + 1) * sizes[layer + 1] for layer in range(len(sizes) - 1)]
    if v.shape[-1] != sum(counts):
        raise ValueError(f"unvec_mlp: expected (..., {sum(counts)}) for sizes {tuple(sizes)}, "
                         f"got {v.shape}")
    pieces = jnp.split(v, list(_cumsum(counts[:-1])), axis=-1)
    return {f"dense_{layer}": unvec_dense(piece, sizes[layer], sizes[layer + 1])
            for layer, piece in enumerate(pieces)}


def _cumsum(values: Sequence[int]) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out



"""Curvature builders by name: ``"full"``, ``"diag"``, ``"kfac"`` and ``"ggn"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from numpyro_hbmeta.curvature.diag import diag
from numpyro_hbmeta.curvature.full import full
from numpyro_hbmeta.curvature.ggn import GGN
from numpyro_hbmeta.curvature.kfac import KFAC

__all__ = ["CURVATURES", "CurvatureBuilder", "curvature_builder"]

CurvatureBuilder = Callable[..., Any]

CURVATURES: dict[str, CurvatureBuilder] = {
    "full": full,
    "diag": diag,
    "kfac": KFAC(),
    "ggn": GGN(),
}


def curvature_builder(curvature: str | CurvatureBuilder) -> CurvatureBuilder:
    """The builder for ``curvature``: a name in :data:`CURVATURES` or a configured builder
    such as ``KFAC(damping=1e-2)``."""
    if isinstance(curvature, str):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {tuple(CURVATURES)} or a builder such "
                             f"as KFAC(damping=...), got {curvature!r}")
        return CURVATURES[curvature]
    if not callable(curvature):
        raise ValueError(f"curvature must be one of {tuple(CURVATURES)} or a builder such as "
                         f"KFAC(damping=...), got {curvature!r}")
    return curvature

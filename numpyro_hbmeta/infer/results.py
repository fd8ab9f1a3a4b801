"""One result type for every method, so exports, tables and plots treat them alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["FitResult"]


class FitResult(NamedTuple):
    """What a fit of a hierarchical model gives, whatever the method.

    Attributes:
        method: method name (``"nuts"``, ``"nuts_marginal"``, ``"svi_normal"``, ``"laplace"``...).
        model: the user's model function.
        data: the model's keyword arguments the fit conditioned on (task-major).
        samples: site name -> draws with leading (chain, draw) axes, constrained, in the
            model's own site shapes (task sites keep their task axis). Point-estimated sites
            are repeated along (chain, draw) so ArviZ summaries work; they are named in
            ``point_sites``.
        point_sites: sites whose draws are a point estimate repeated (sd 0 by construction).
        task_diagnostics: per-task diagnostics, name -> array (tasks,) (inner gradient norm,
            Newton iterations, smallest curvature eigenvalue) or (chain, draw, tasks).
        sample_stats: sampler statistics, name -> array (chain, draw) (NUTS), may be empty.
        wall_time: seconds for the fit, compilation included.
        info: scalar facts for reports (divergences, final loss, optimiser steps...).
        approximate: why the method is approximate for this model, or ``None`` when exact
            in its own terms (NUTS; Laplace on linear-Gaussian tasks).
    """

    method: str
    model: Callable
    data: dict[str, Any]
    samples: dict[str, np.ndarray]
    point_sites: tuple[str, ...] = ()
    task_diagnostics: dict[str, np.ndarray] = {}  # noqa: RUF012 - never mutated
    sample_stats: dict[str, np.ndarray] = {}  # noqa: RUF012
    wall_time: float = float("nan")
    info: dict[str, Any] = {}  # noqa: RUF012
    approximate: str | None = None

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

"""What ``MetaEB`` checks on a fit, and how it words the trouble it finds.

The driver's job is to move the globals; this module's is to say whether the numbers it
returns can be vouched for:

* per chunk of steps, from the :class:`~numpyro_hbmeta.eb.StepInfo` of each step: tasks whose
  inner solve diverged (truncated gradient descent whose loss rose) or did not converge
  (Newton), warned about once per kind with the tasks, the step and a remedy with numbers;
* a meaningless objective (non-finite, or a gradient so large that no parameter can move):
  a :class:`FloatingPointError` whose message is the library's own diagnosis, made with
  NumPyro's argument validation off so that an invalid φ̂ or global cannot replace it with
  "invalid scale parameter";
* at the end, whether the outer optimisation converged (:class:`OuterConvergence`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["OuterConvergence", "outer_convergence", "overflow_threshold"]

#: How many offending task indices a step records (a fixed size keeps the step jit-able).
MAX_REPORTED_TASKS = 8


def overflow_threshold(dtype) -> float:
    """The gradient norm beyond which squares overflow: Adam's second moment becomes inf,
    its update 0, and no parameter moves (seen at ‖g‖ ≈ 5e24 in float32)."""
    return math.sqrt(float(jnp.finfo(dtype).max)) / 10.0


def first_tasks(mask: jnp.ndarray, indices: jnp.ndarray | None) -> jnp.ndarray:
    """The first :data:`MAX_REPORTED_TASKS` task indices where ``mask`` is True (−1 pads),
    mapped through the batch's ``indices`` when the step saw a batch of tasks."""
    (where,) = jnp.nonzero(mask, size=MAX_REPORTED_TASKS, fill_value=-1)
    if indices is None:
        return where.astype(jnp.int32)
    return jnp.where(where >= 0, jnp.asarray(indices)[jnp.maximum(where, 0)], -1
                     ).astype(jnp.int32)


class OuterConvergence(NamedTuple):
    """Whether the optimiser of the globals has settled, with the numbers and thresholds.

    Attributes:
        converged: both criteria hold (with a task batch, the gradient of one batch is noise
            around the full gradient, so only the loss criterion is applied).
        grad_norm: ‖∇ loss‖₂ at the last step.
        grad_tol: the bound it is held to, ``grad_rtol · max(1, |loss|)``.
        rel_loss_change: |mean of the last window − mean of the window before| / max(1, |loss|).
        loss_rtol: the bound on it.
        window: steps per window (a tenth of the run, between 1 and 50).
    """

    converged: bool
    grad_norm: float
    grad_tol: float
    rel_loss_change: float
    loss_rtol: float
    window: int

    def describe(self) -> str:
        return (f"gradient norm {self.grad_norm:.3g} (threshold {self.grad_tol:.3g}), relative "
                f"change of the loss over the last {self.window} steps "
                f"{self.rel_loss_change:.3g} (threshold {self.loss_rtol:.3g})")


def outer_convergence(losses: np.ndarray, grad_norm: float, *, loss_rtol: float,
                      grad_rtol: float, batched: bool) -> OuterConvergence:
    """Judge the end of a run from its losses and its last gradient norm."""
    losses = np.asarray(losses, np.float64)
    window = int(min(50, max(1, losses.size // 10)))
    scale = max(1.0, abs(float(losses[-1])))
    if losses.size >= 2 * window:
        last = losses[-window:].mean()
        before = losses[-2 * window:-window].mean()
        rel_change = abs(last - before) / scale
    else:  # too short to tell a plateau
        rel_change = float("inf")
    grad_tol = grad_rtol * scale
    converged = rel_change <= loss_rtol and (batched or grad_norm <= grad_tol)
    return OuterConvergence(bool(converged), float(grad_norm), float(grad_tol),
                            float(rel_change), float(loss_rtol), window)


def nonfinite_reason(loss: float, grad_norm: float, threshold: float) -> str:
    """Why a step was refused, in words."""
    if not np.isfinite(loss):
        return "the objective is not finite"
    if not np.isfinite(grad_norm):
        return "its gradient is not finite"
    if grad_norm >= threshold:
        return (f"its gradient norm {grad_norm:.3g} is so large that squaring it overflows "
                "(Adam's second moment becomes inf and no parameter moves)")
    return "the update made a global non-finite"


def task_list(values: Sequence[int] | np.ndarray, limit: int = 20) -> list[int]:
    values = sorted({int(v) for v in np.asarray(values).reshape(-1) if v >= 0})
    return values[:limit]


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))

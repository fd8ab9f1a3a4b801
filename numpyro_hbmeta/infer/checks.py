"""What ``MetaEB`` checks on a fit, and how it words the trouble it finds.

The driver's job is to move the globals; this module's is to say whether the numbers it
returns can be vouched for:

* per chunk of steps, from the :class:`~numpyro_hbmeta.infer.state.StepInfo` of each step:
  tasks whose inner solve diverged (truncated gradient descent whose loss rose) or did not converge
  (Newton), warned about once per kind with the tasks, the step and a remedy with numbers;
* a meaningless objective (non-finite, or a gradient so large that no parameter can move):
  a :class:`FloatingPointError` whose message is the library's own diagnosis, made with
  NumPyro's argument validation off so that an invalid φ̂ or global cannot replace it with
  "invalid scale parameter";
* at the end, whether the outer optimisation converged (:class:`OuterConvergence`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_hbmeta.data import take_tasks
from numpyro_hbmeta.inner import Newton, TruncatedGD

if TYPE_CHECKING:
    from numpyro_hbmeta.infer.eb import MetaEB
    from numpyro_hbmeta.infer.state import MetaEBState, StepInfo

__all__ = ["Monitor", "OuterConvergence", "inner_remedy", "outer_convergence",
           "overflow_threshold"]

#: Why an inactive global has no estimate (``FitResult.info["inactive_reason"]``).
INACTIVE_REASON = ("not estimated: the {objective} objective does not depend on it (zero "
                   "gradient), so its value would be the start value (MetaEB's random start or "
                   "the init_params)")

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


class Monitor:
    """Reads each chunk's ``StepInfo`` on the host: raises on refused steps, warns once per
    kind about inner solves, and keeps what the end of the run needs."""

    def __init__(self, driver: MetaEB, key_steps) -> None:
        self.driver, self.key_steps = driver, key_steps
        self.warned: set[str] = set()
        self.active: dict[str, bool] = {}
        self.last_grad_norm = float("nan")

    def inactive(self) -> tuple[str, ...]:
        return tuple(n for n, flag in self.active.items() if not flag)

    def check(self, infos: StepInfo, ran: np.ndarray, state: MetaEBState, support, query,
              step_data) -> None:
        steps = int(state.step) - int(ran.sum()) + np.arange(int(ran.sum()))
        for name, flags in infos.active.items():
            self.active[name] = self.active.get(name, False) or bool(flags[ran].any())
        bad = np.nonzero(ran & ~infos.ok)[0]
        if bad.size:
            self._refuse(infos, int(bad[0]), int(state.step), state, support, query, step_data)
        if ran.any():
            self.last_grad_norm = float(infos.grad_norm[ran][-1])
        for kind, counts, tasks in (("diverged", infos.num_diverged, infos.diverged_tasks),
                                    ("unconverged", infos.num_unconverged,
                                     infos.unconverged_tasks)):
            hit = np.nonzero(ran & (counts > 0))[0]
            if hit.size and kind not in self.warned:
                self.warned.add(kind)
                data = step_data[hit[0]] if step_data is not None else (support, query)
                # The first step with such tasks: its count and its tasks (the union over
                # the chunk's steps would not match the count the message gives).
                self._warn(kind, int(steps[hit[0]]), task_list(tasks[hit[0]]),
                           int(counts[hit[0]]), state, *data)

    def _refuse(self, infos, index, step, state, support, query, step_data) -> None:
        threshold = overflow_threshold(infos.grad_norm.dtype)
        reason = nonfinite_reason(float(infos.loss[index]),
                                            float(infos.grad_norm[index]), threshold)
        if step_data is not None:
            support, query = step_data[index]
        driver = self.driver
        message = driver.failure_report(step, state.params, support, query, reason)
        tasks = task_list(infos.diverged_tasks[index])
        if tasks and isinstance(driver.inner, TruncatedGD):
            message += "\n" + self._step_size_remedy(state, support, tasks)
        raise FloatingPointError(message)

    def _warn(self, kind, step, tasks, count, state, support, query) -> None:
        inner = self.driver.inner
        if kind == "diverged":
            what = ("the inner gradient descent diverged (its loss rose)"
                    if isinstance(inner, TruncatedGD)
                    else "Newton's iterates became non-finite")
            remedy = (self._step_size_remedy(state, support, tasks)
                      if isinstance(inner, TruncatedGD) else inner_remedy(inner))
        else:
            what = f"Newton did not converge within max_steps={inner.max_steps}"
            remedy = inner_remedy(inner)
        warnings.warn(f"MetaEB: at step {step}, {what} for {count} task(s), e.g. {tasks}. "
                      f"{remedy}", stacklevel=4)

    def _step_size_remedy(self, state, support, tasks) -> str:
        """"β = 0.3 but 1/λ_max = 0.02 for task 4": λ_max of the task's inner-loss Hessian
        at its start, at the current globals."""
        inner = self.driver.inner
        try:
            lam = lambda_max(self.driver, state.params, support, tasks)
        except (ValueError, FloatingPointError, TypeError) as err:  # reported, not hidden
            return f"(the step-size bound could not be computed: {err})"
        worst = int(np.argmax(lam))
        bound = 1.0 / float(lam[worst]) if lam[worst] > 0 else float("inf")
        return (f"β = {inner.step_size:g} but 1/λ_max = {bound:.3g} for task {tasks[worst]} "
                f"(λ_max: the largest eigenvalue of that task's inner-loss Hessian at the "
                f"current globals). Use TruncatedGD(step_size < {bound:.3g}); below "
                f"{0.5 * bound:.3g} the loss falls monotonically on a quadratic, and MAML's "
                "implicit prior exists only for β·λ < 1.")


def lambda_max(driver: MetaEB, params, support, tasks) -> np.ndarray:
    """Largest eigenvalue of the inner loss's Hessian at φ⁰ for ``tasks``, by the driver's
    own compiled ``_lambda_max_at`` (the end-of-run implicit-prior check uses it too)."""
    constrained = driver._constrained(params, support, None)
    if driver._processes:  # every local task (chunk by chunk), gathered: the named tasks
        # live anywhere
        local = driver._per_task(lambda chunk: driver._lambda_max_jit(constrained, chunk),
                                 driver._local(support))
        return driver._gathered(local)[np.asarray(tasks)]
    subset = take_tasks(support, jnp.asarray(tasks))
    return np.asarray(driver._lambda_max_jit(constrained, subset))


def inner_remedy(inner) -> str:
    if isinstance(inner, Newton):
        return (f"Raise Newton(max_steps=...) (now {inner.max_steps}), or start the globals "
                "nearer the data with init_params.")
    return (f"Reduce TruncatedGD's step_size (now {inner.step_size:g}) or its num_steps "
            f"(now {inner.num_steps}).")


def rounded(params) -> dict[str, Any]:
    return {k: np.round(np.asarray(v, np.float64), 4).tolist() for k, v in params.items()}

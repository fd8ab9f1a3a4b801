"""What :class:`~numpyro_hbmeta.MetaEB` carries between steps and hands back after a run."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from numpyro_hbmeta.infer.checks import OuterConvergence

__all__ = ["MetaEBResult", "MetaEBState", "StepInfo"]


class MetaEBState(NamedTuple):
    """The optimiser's state: what :meth:`MetaEB.update` maps to the next one.

    Attributes:
        params: unconstrained values of the global sites.
        opt_state: the optax state.
        step: () int32, optimiser steps taken (it indexes the step keys).
    """

    params: dict[str, jnp.ndarray]
    opt_state: Any
    step: jnp.ndarray


class StepInfo(NamedTuple):
    """Diagnostics of one :meth:`MetaEB.update` (BlackJAX's ``info``), all on device.

    Attributes:
        loss: () −Σ_j objective_j on this step's tasks, before the update.
        grad_norm: () global ℓ2 norm of the gradient.
        num_diverged: () tasks whose inner solve diverged (loss rose or became non-finite).
        num_unconverged: () tasks whose inner solve did not converge (``Newton`` only;
            truncated gradient descent stops after K steps by design).
        diverged_tasks: (8,) the first diverged task indices (−1 pads), in the full task set.
        unconverged_tasks: (8,) the same for non-converged tasks.
        active: global -> () bool, the gradient is not identically zero.
        ok: () bool: the loss and gradient are finite, the gradient does not overflow when
            squared, and the updated globals are finite. :meth:`run` refuses a step that is
            not ok and raises with a diagnosis.
    """

    loss: jnp.ndarray
    grad_norm: jnp.ndarray
    num_diverged: jnp.ndarray
    num_unconverged: jnp.ndarray
    diverged_tasks: jnp.ndarray
    unconverged_tasks: jnp.ndarray
    active: dict[str, jnp.ndarray]
    ok: jnp.ndarray


class MetaEBResult(NamedTuple):
    """Result of :meth:`MetaEB.run`.

    Attributes:
        params: constrained values of the global sites.
        losses: (num_steps,) NumPy array, the negative objective at each step of this run
            (before its update).
        state: final optimiser state; pass it as ``run(..., init_state=result.state)`` to go on.
        inactive_sites: globals whose gradient was exactly zero at every step: the objective
            does not depend on them (e.g. τ under ``maml``, where the implicit prior replaces
            p(φ | θ)); their values are the initial ones and carry no information.
        boundary_sites: positive globals (scales) whose estimate sits at the boundary 0: the
            objective does not get worse when the value is shrunk 1000-fold (e.g. τ̂ = 0 on
            eight schools). A warning names the remedies.
        convergence: whether the outer optimisation converged, with its numbers and
            thresholds (:class:`~numpyro_hbmeta.infer.checks.OuterConvergence`).
    """

    params: dict[str, jnp.ndarray]
    losses: jnp.ndarray
    state: MetaEBState
    inactive_sites: tuple[str, ...] = ()
    boundary_sites: tuple[str, ...] = ()
    convergence: OuterConvergence | None = None

    @property
    def converged(self) -> bool | None:
        """Whether the outer optimisation converged (``None`` if not judged)."""
        return None if self.convergence is None else self.convergence.converged

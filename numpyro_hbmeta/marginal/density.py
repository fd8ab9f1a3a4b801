"""Per-task log densities of a model, as functions of the flat task parameters.

For fixed globals θ and task data D_j, the model's log joint splits over tasks,

    log p(D, Φ | θ) = Σ_j [ log p(D_j | φ_j) + log p(φ_j | θ) ],

and the inner solvers and curvature backends work with the two per-task terms as functions
of Φ, an array of shape (tasks, d) holding each task's unconstrained parameters flattened
(the layout is :class:`~numpyro_hbmeta.marginal.spec.SiteSpec`). ``log p(φ_j | θ)`` includes the
log-Jacobian of the map from unconstrained to constrained values, so densities are in the
space the solvers move in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost

from numpyro_hbmeta.marginal.rerun import rerun, task_scale
from numpyro_hbmeta.marginal.spec import TaskSpec, flatten, unflatten
from numpyro_hbmeta.validate import InputError

__all__ = [
    "IndependenceProbe",
    "ProbePointError",
    "TaskLogDensity",
    "check_task_independence",
    "flatten",
    "probe_task_independence",
    "task_log_density",
    "unflatten",
]


class TaskLogDensity(NamedTuple):
    """Per-task terms of the log joint, each of shape (tasks,)."""

    log_lik: jnp.ndarray
    log_prior: jnp.ndarray

    @property
    def log_joint(self) -> jnp.ndarray:
        return self.log_lik + self.log_prior


def per_task_sum(x: jnp.ndarray, spec: TaskSpec, name: str) -> jnp.ndarray:
    """Sum a site's batch-shaped log density over every axis but the task axis."""
    x = jnp.asarray(x)
    if x.ndim < -spec.plate_dim or x.shape[spec.plate_dim] != spec.subsample_size:
        raise InputError(
            f"site {name!r}: its log density has shape {x.shape}, with no task axis of size "
            f"{spec.subsample_size} at dim {spec.plate_dim}; a task site must depend on its task"
        )
    return jnp.moveaxis(x, spec.plate_dim, 0).reshape(spec.subsample_size, -1).sum(-1)


def task_log_density(model: Callable, spec: TaskSpec, globals_: Mapping[str, jnp.ndarray],
                     indices: jnp.ndarray, data: Mapping[str, Any],
                     phi: jnp.ndarray) -> TaskLogDensity:
    """Per-task log p(D_j | φ_j) and log p(φ_j | θ) (+ log-Jacobian) at Φ = ``phi``.

    Args:
        model: the user's model.
        spec: its task structure.
        globals_: constrained values of the global latent sites.
        indices: the subsample indices of the tasks plate (all tasks when not subsampled).
        data: the model's keyword arguments for this data set (support or query).
        phi: (tasks, d) unconstrained task parameters.
    """
    tr, unconstrained = rerun(model, spec, globals_, indices, data, phi)
    return _sum_task_sites(tr, spec, unconstrained)


def _sum_task_sites(tr, spec: TaskSpec, unconstrained) -> TaskLogDensity:
    log_lik = log_prior = 0.0
    for name in spec.observed_sites:
        site = tr[name]
        lp = site["fn"].log_prob(site["value"]) * task_scale(site, spec)
        log_lik = log_lik + per_task_sum(lp, spec, name)
    for task_site in spec.task_sites:
        site = tr[task_site.name]
        fn, value = site["fn"], site["value"]
        transform = biject_to(fn.support)
        log_jac = transform.log_abs_det_jacobian(unconstrained[task_site.name], value)
        log_jac = sum_rightmost(log_jac, jnp.ndim(log_jac) - jnp.ndim(value) + len(
            fn.event_shape))
        lp = (fn.log_prob(value) + log_jac) * task_scale(site, spec)
        log_prior = log_prior + per_task_sum(lp, spec, task_site.name)
    return TaskLogDensity(log_lik, log_prior)


class ProbePointError(InputError):
    """The log density (or its gradient) is not finite at the probe point of the
    independence check: a statement about the point, not about coupling."""


class IndependenceProbe(NamedTuple):
    """Per-task values at a probe point Φ along a random direction V, each (tasks,).

    Attributes:
        log_density: ℓ_j(Φ).
        directional: the derivative of ℓ_j along V (all tasks moved at once).
        separate: ⟨∇_{φ_j} Σ_i ℓ_i, V_j⟩, what ``directional`` is without coupling.
        grad_finite: whether ∇_{φ_j} Σ_i ℓ_i is finite.
    """

    log_density: jnp.ndarray
    directional: jnp.ndarray
    separate: jnp.ndarray
    grad_finite: jnp.ndarray


def _probe(model, spec, static_data, globals_, indices, arrays, phi, direction):
    data = {**arrays, **dict(static_data)}

    def log_joint(p):
        return task_log_density(model, spec, globals_, indices, data, p).log_joint

    values = log_joint(phi)
    grads = jax.grad(lambda p: log_joint(p).sum())(phi)
    _, directional = jax.jvp(log_joint, (phi,), (direction,))
    return IndependenceProbe(values, directional, jnp.sum(grads * direction, axis=-1),
                             jnp.all(jnp.isfinite(grads), axis=-1))


# Compiled once per (model, task structure, non-array arguments) and data shapes: a closure
# over the data would be a new function, hence a new compilation, on every call.
_probe_jit = jax.jit(_probe, static_argnums=(0, 1, 2))


def probe_task_independence(model: Callable, spec: TaskSpec,
                            globals_: Mapping[str, jnp.ndarray], indices: jnp.ndarray,
                            data: Mapping[str, Any], phi: jnp.ndarray,
                            rng_key: jnp.ndarray) -> IndependenceProbe:
    """Evaluate the per-task log joint and its derivatives at Φ = ``phi`` along a random
    direction (see :func:`check_task_independence`). Arguments as :func:`task_log_density`."""
    phi = jnp.asarray(phi)
    if not jnp.issubdtype(phi.dtype, jnp.inexact):
        phi = phi.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    direction = jax.random.normal(rng_key, phi.shape, phi.dtype)
    arrays = {k: v for k, v in data.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    static_data = tuple((k, v) for k, v in data.items() if k not in arrays)
    try:
        hash((model, spec, static_data))
    except TypeError:  # an unhashable non-array argument: evaluate without compiling
        return _probe(model, spec, static_data, globals_, indices, arrays, phi, direction)
    return _probe_jit(model, spec, static_data, dict(globals_), indices, arrays, phi, direction)


def check_task_independence(probe: IndependenceProbe, *, where: str = "") -> None:
    """Raise if task j's log density depends on another task's parameters.

    Batched Hessian-vector products give every task's Hessian at once only when
    ℓ_j depends on φ_j alone. Then the directional derivative of ℓ_j along a random V equals
    ⟨∇_{φ_j} Σ_i ℓ_i, V_j⟩; a coupling term breaks the equality (with probability one). A
    probe point where ℓ_j or its gradient is not finite says nothing about coupling and is
    reported as what it is.

    Args:
        probe: from :func:`probe_task_independence` (concrete values).
        where: the probe point, for messages (e.g. ``"θ = ..., φ = E[φ | θ]"``).
    """
    values, directional, separate = (np.asarray(x) for x in probe[:3])
    finite = np.isfinite(values) & np.asarray(probe.grad_finite) & np.isfinite(directional)
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        raise ProbePointError(
            f"the log density of task(s) {bad[:10].tolist()} (or its gradient) is not finite "
            f"at the probe point {where} (log densities {values[bad[:5]].tolist()}), so the "
            "check that tasks are independent cannot run there; pass values of the globals "
            "closer to the data: marginal.check(support, query, params={...}), or "
            "MetaEB.run(..., init_params={...}) (constrained values)")
    gap = np.abs(directional - separate)
    tol = 1e-4 * (1.0 + np.abs(separate))
    coupled = np.nonzero(~(gap <= tol))[0]
    if coupled.size:
        raise InputError(
            f"the model couples tasks inside the tasks plate: the log density of task(s) "
            f"{coupled[:10].tolist()} depends on other tasks' parameters (directional derivative "
            f"{directional[coupled[0]]:.6g} vs {separate[coupled[0]]:.6g} with no coupling). Move "
            "shared quantities outside the plate."
        )

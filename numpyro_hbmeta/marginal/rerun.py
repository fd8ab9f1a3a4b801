"""Re-running the user's model at given task parameters: the one place that does it.

Everything the library computes per task (the log densities of
:mod:`numpyro_hbmeta.marginal.density`, the Fisher statistics of
:mod:`numpyro_hbmeta.marginal.fisher`, the ArviZ export's masks) comes from a trace of the user's
model with

* the task sites set to the constrained values of Φ (tasks, d),
* the global sites set to their constrained values,
* the tasks plate given its subsample indices (so it draws none),
* optionally the observed values replaced (Fisher targets sampled from the predictive),

run under ``handlers.block`` so that nothing reaches an outer trace, sampler or rng seed
(DESIGN, "known pitfalls"). Two rules go with it and live here too:

* **scale**: a subsampled tasks plate scales each site by J / batch; the per-task objective
  must not carry that factor (the outer factor does), any other scale (``handlers.scale``)
  stays: :func:`task_scale`;
* **masks**: ``handlers.mask`` wraps the distribution in a ``MaskedDistribution`` (possibly
  under ``Independent``/``ExpandedDistribution``); :func:`unwrap_mask` reads the mask inside
  traced code, :func:`site_mask` as a concrete array.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.distribution import ExpandedDistribution, MaskedDistribution
from numpyro.distributions.transforms import biject_to

from numpyro_hbmeta.marginal.spec import TaskSpec, unflatten
from numpyro_hbmeta.validate import InputError

__all__ = ["rerun", "site_mask", "task_scale", "unwrap_mask"]


def rerun(model: Callable, spec: TaskSpec, globals_: Mapping[str, Any], indices: Any,
          data: Mapping[str, Any], phi: jnp.ndarray, *,
          targets: Callable[[dict], Any] | None = None,
          handlers_: Iterable[Any] = ()) -> tuple[dict[str, Any], dict[str, jnp.ndarray]]:
    """Trace ``model(**data)`` at Φ = ``phi``, hidden from outer handlers.

    Args:
        model: the user's model.
        spec: its task structure.
        globals_: constrained values of the global latent sites.
        indices: the tasks plate's subsample indices.
        data: the model's keyword arguments (support or query).
        phi: (tasks, d) unconstrained task parameters.
        targets: ``msg -> value`` replacing observed values (Fisher targets), or ``None``.
        handlers_: extra Messengers entered inside the substitution (e.g. the layer
            recorder of the K-FAC statistics).

    Returns:
        The trace and the unconstrained task-site values it used.

    Raises:
        InputError: a latent site appears that the first trace did not have (the model's
            structure depends on values).
    """
    unconstrained = unflatten(spec, phi)

    def substitute_fn(msg):
        name = msg["name"]
        if msg["type"] == "plate":
            return indices if name == spec.plate_name else None
        if msg["type"] != "sample":
            return None
        if msg.get("is_observed"):
            return None if targets is None or name not in spec.observed_sites \
                else targets(msg)
        if name in unconstrained:
            return biject_to(msg["fn"].support)(unconstrained[name])
        if name in globals_:
            return globals_[name]
        raise InputError(f"latent site {name!r} appeared in a re-run of the model but not in "
                         "its first trace; the model's structure must not depend on values")

    with ExitStack() as stack:
        stack.enter_context(handlers.block())
        tr = stack.enter_context(handlers.trace())
        stack.enter_context(handlers.substitute(substitute_fn=substitute_fn))
        for handler in handlers_:
            stack.enter_context(handler)
        model(**data)
    return tr, unconstrained


def task_scale(site: Mapping[str, Any], spec: TaskSpec) -> float | jnp.ndarray:
    """The site's scale without the tasks plate's subsampling factor J / batch."""
    scale = site["scale"]
    if scale is None:
        return 1.0
    return scale * spec.subsample_size / spec.size


def unwrap_mask(fn) -> tuple[Any, Any]:
    """The innermost distribution and the mask around it, broadcast to ``fn.shape()``
    (``True`` when nothing is masked); traced values are fine."""
    mask = True
    while isinstance(fn, MaskedDistribution | dist.Independent | ExpandedDistribution):
        if isinstance(fn, MaskedDistribution) and fn._mask is not True:
            # numpyro keeps the handlers.mask array (or False) in the private ``_mask``
            m = jnp.asarray(fn._mask)
            m = m.reshape(m.shape + (1,) * len(fn.event_shape))
            m = jnp.broadcast_to(m, fn.shape())
            mask = m if mask is True else jnp.logical_and(mask, m)
        fn = fn.base_dist
    return fn, mask


def site_mask(fn) -> np.ndarray | None:
    """The mask of a site's distribution over its batch shape, as a concrete boolean array;
    ``None`` when every point counts."""
    mask = np.ones(tuple(fn.batch_shape), bool)
    while fn is not None:
        if isinstance(fn, MaskedDistribution) and fn._mask is not True:
            mask = mask & np.broadcast_to(np.asarray(fn._mask, bool), mask.shape)
        fn = getattr(fn, "base_dist", None)
    return None if mask.all() else mask

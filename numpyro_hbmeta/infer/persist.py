"""Saving a ``MetaEB`` fit to disk and reading it back.

One ``.npz`` file (NumPy's own zip of arrays, no pickle: loading runs no code from the file):

* ``params/<site>``: the unconstrained globals, ``constrained/<site>`` the estimates;
  ``opt_state/<i>``: the optax state's leaves in
  tree order; ``step``, ``losses``;
* ``__meta__``: JSON with the format version, the driver's settings (inner solver, objective,
  curvature, η, hyperprior), the checks of the run (inactive and boundary sites, outer
  convergence) and the model's name.

The model and the optimiser are code, not data: :func:`load_fit` takes the model, and an
optimiser whose state has the saved structure (default Adam, the driver's default). A
mismatch is an error that names both structures, never a silently different state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_hbmeta import curvature as curvature_module
from numpyro_hbmeta.infer.checks import OuterConvergence
from numpyro_hbmeta.inner import Newton, TruncatedGD

__all__ = ["FORMAT_VERSION", "load_fit", "save_fit"]

FORMAT_VERSION = 1
_INNER = {"TruncatedGD": TruncatedGD, "Newton": Newton}


def _settings_of(value: Any) -> Any:
    """A dataclass setting (inner solver, curvature builder) as JSON."""
    if isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"type": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot save the setting {value!r}: only names and the library's "
                    "dataclasses (TruncatedGD, Newton, KFAC, GGN) are saved")


def _setting_from(saved: Any, registry: dict[str, type]) -> Any:
    if isinstance(saved, str):
        return saved
    cls = registry.get(saved["type"])
    if cls is None:
        raise ValueError(f"the saved fit uses {saved['type']}, which this version does not "
                         f"know (known: {sorted(registry)})")
    return cls(**saved["fields"])


def _model_name(model: Callable) -> str:
    return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', repr(model))}"


def save_fit(path: str | os.PathLike, driver, result) -> None:
    """Write ``result`` of ``driver.run`` to ``path`` (see the module docstring)."""
    state = result.state
    leaves = jax.tree.leaves(state.opt_state)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": _model_name(driver.model),
        "inner": _settings_of(driver.inner),
        "objective": driver.marginal.objective,
        "curvature": _settings_of(driver.curvature),
        "eta": float(driver.eta),
        "hyperprior": bool(driver.hyperprior),
        "params": sorted(state.params),
        "num_opt_leaves": len(leaves),
        "opt_state_structure": str(jax.tree.structure(state.opt_state)),
        "inactive_sites": list(result.inactive_sites),
        "boundary_sites": list(result.boundary_sites),
        "convergence": None if result.convergence is None else result.convergence._asdict(),
    }
    arrays = {f"params/{k}": np.asarray(v) for k, v in state.params.items()}
    arrays.update({f"constrained/{k}": np.asarray(v) for k, v in result.params.items()})
    arrays.update({f"opt_state/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    arrays["step"] = np.asarray(state.step)
    arrays["losses"] = np.asarray(result.losses)
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, **arrays)


def load_fit(path: str | os.PathLike, model: Callable, *,
             optimizer: optax.GradientTransformation | None = None, driver_class=None):
    """Read a fit written by :func:`save_fit`; returns ``(driver, result)``.

    Raises:
        ValueError: the file is not a saved fit of this format, or ``optimizer``'s state
            does not have the saved structure.
    """
    from numpyro_hbmeta.infer.eb import MetaEB
    from numpyro_hbmeta.infer.state import MetaEBResult, MetaEBState

    driver_class = driver_class or MetaEB
    with np.load(path, allow_pickle=False) as archive:
        if "__meta__" not in archive:
            raise ValueError(f"{os.fspath(path)!r} is not a saved MetaEB fit (no __meta__)")
        meta = json.loads(str(archive["__meta__"]))
        arrays = {k: archive[k] for k in archive.files}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has format version "
                         f"{meta.get('format_version')}, this library reads {FORMAT_VERSION}")
    builders = {"KFAC": curvature_module.KFAC, "GGN": curvature_module.GGN}
    driver = driver_class(model, inner=_setting_from(meta["inner"], _INNER),
                          objective=meta["objective"],
                          curvature=_setting_from(meta["curvature"], builders),
                          optimizer=optimizer, eta=meta["eta"], hyperprior=meta["hyperprior"])
    params = {k: jnp.asarray(arrays[f"params/{k}"]) for k in meta["params"]}
    template = driver.optimizer.init(params)
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != meta["num_opt_leaves"]:
        raise ValueError(
            f"the optimizer passed to load has a state with {treedef.num_leaves} leaves "
            f"({treedef}), the saved one has {meta['num_opt_leaves']} "
            f"({meta['opt_state_structure']}); pass the optimizer the fit was made with")
    leaves = [jnp.asarray(arrays[f"opt_state/{i}"]) for i in range(treedef.num_leaves)]
    for i, (saved, fresh) in enumerate(zip(leaves, jax.tree.leaves(template), strict=True)):
        if jnp.shape(saved) != jnp.shape(fresh):
            raise ValueError(f"optimizer state leaf {i} has shape {jnp.shape(saved)} in the "
                             f"file but {jnp.shape(fresh)} for the optimizer passed to load")
    state = MetaEBState(params, jax.tree.unflatten(treedef, leaves),
                        jnp.asarray(arrays["step"]))
    convergence = (None if meta["convergence"] is None
                   else OuterConvergence(**meta["convergence"]))
    constrained = {k: jnp.asarray(arrays[f"constrained/{k}"]) for k in meta["params"]}
    result = MetaEBResult(constrained, jnp.asarray(arrays["losses"]), state,
                          tuple(meta["inactive_sites"]), tuple(meta["boundary_sites"]),
                          convergence)
    return driver, result

"""Tasks sharded over devices: the layout ``MetaEB(..., mesh=...)`` uses.

One mesh axis, ``"tasks"``. Every task-major array (leading axis = the task) is split along
that axis across the mesh's devices, ``NamedSharding(mesh, P("tasks"))``; the globals and the
optimiser state are replicated, ``NamedSharding(mesh, P())``. Nothing else is annotated: under
``jax.jit`` XLA's partitioner (GSPMD) propagates the layout, so the inner solves, the
curvature and the per-task objectives run where their tasks live, and the sum over tasks in
the meta-gradient becomes the all-reduce XLA inserts. A task batch drawn from sharded data
(``task_batch_size``) is a gather XLA lowers to collectives.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts) gives
four host devices to try it with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from numpyro_hbmeta.validate import InputError

__all__ = ["TASK_AXIS", "replicate", "shard_tasks", "task_mesh"]

TASK_AXIS = "tasks"


def task_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """``None`` (no sharding), ``"auto"`` (every local device) or a ``Mesh`` with a
    ``"tasks"`` axis."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise InputError(f"mesh must be None, 'auto' or a jax.sharding.Mesh with a "
                             f"{TASK_AXIS!r} axis, got {mesh!r}")
        return Mesh(np.asarray(jax.local_devices()), (TASK_AXIS,))
    if not isinstance(mesh, Mesh) or TASK_AXIS not in mesh.axis_names:
        raise InputError(f"mesh must be a jax.sharding.Mesh with a {TASK_AXIS!r} axis, got "
                         f"{mesh!r}")
    return mesh


def shard_tasks(data: Mapping[str, Any], mesh: Mesh, what: str) -> dict[str, Any]:
    """Place every task-major array of ``data`` split over the mesh's ``"tasks"`` axis.

    Raises:
        InputError: the number of tasks is not a multiple of the number of devices on the
            axis (an uneven split would give devices different shapes).
    """
    devices = mesh.shape[TASK_AXIS]
    sharding = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
    out = {}
    for key, value in data.items():
        if hasattr(value, "shape") and np.ndim(value) >= 1:
            if value.shape[0] % devices:
                raise InputError(
                    f"{what}[{key!r}] has {value.shape[0]} tasks, which the mesh's "
                    f"{devices} devices cannot split evenly; use a multiple of {devices} "
                    "tasks (or a task_batch_size that is one) or a smaller mesh")
            value = jax.device_put(value, sharding)
        out[key] = value
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

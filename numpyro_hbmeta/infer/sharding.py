"""Tasks sharded over devices and processes: the layout ``MetaEB(..., mesh=...)`` uses.

One mesh axis, ``"tasks"``. Every task-major array (leading axis = the task) is split along
that axis across the mesh's devices, ``NamedSharding(mesh, P("tasks"))``; the globals and the
optimiser state are replicated, ``NamedSharding(mesh, P())``. Nothing else is annotated: under
``jax.jit`` XLA's partitioner (GSPMD) propagates the layout, so the inner solves, the
curvature and the per-task objectives run where their tasks live, and the sum over tasks in
the meta-gradient becomes the all-reduce XLA inserts. A task batch drawn from sharded data
(``task_batch_size``) is a gather XLA lowers to collectives; the driver lays the gathered
batch out ``P("tasks")`` again (:meth:`MetaEB._split_batch
<numpyro_hbmeta.infer.eb.MetaEB._split_batch>`), so each device solves its share of the
batch, and :meth:`~numpyro_hbmeta.infer.eb.MetaEB.init` returns its state replicated.

Several processes (``jax.distributed``): a mesh whose devices belong to more than one process
(``"auto"`` after ``jax.distributed.initialize()``) makes the data *process-local*: each
process passes only its share of the tasks, the same number on every process, and
:func:`shard_tasks` assembles the global arrays with ``jax.make_array_from_process_local_data``
(process p's tasks follow process p − 1's in the global task order). Eager work on such data
(model checks, end-of-run diagnoses) runs on each process's own part (:func:`local_view`), and
per-task results are gathered from every process (:func:`gather_tasks`).

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts) gives
four host devices to try it with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from numpyro_hbmeta.validate import InputError

__all__ = ["TASK_AXIS", "gather_tasks", "local_view", "replicate", "shard_tasks",
           "spans_processes", "task_mesh", "to_host"]

TASK_AXIS = "tasks"


def task_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """``None`` (no sharding), ``"auto"`` (every device of every process: the local ones in
    a single process) or a ``Mesh`` with a ``"tasks"`` axis."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise InputError(f"mesh must be None, 'auto' or a jax.sharding.Mesh with a "
                             f"{TASK_AXIS!r} axis, got {mesh!r}")
        return Mesh(np.asarray(jax.devices()), (TASK_AXIS,))
    if not isinstance(mesh, Mesh) or TASK_AXIS not in mesh.axis_names:
        raise InputError(f"mesh must be a jax.sharding.Mesh with a {TASK_AXIS!r} axis, got "
                         f"{mesh!r}")
    return mesh


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether the mesh holds devices of more than one process (its data are then
    process-local shares of the tasks)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def shard_tasks(data: Mapping[str, Any], mesh: Mesh, what: str) -> dict[str, Any]:
    """Place every task-major array of ``data`` split over the mesh's ``"tasks"`` axis.

    With a mesh over several processes, ``data`` is this process's share of the tasks and the
    result holds every process's (a collective: every process calls it, in the same order).

    Raises:
        InputError: the number of tasks is not a multiple of the number of devices on the
            axis (an uneven split would give devices different shapes), or the processes
            hold different numbers of tasks.
    """
    if spans_processes(mesh):
        return _assemble_tasks(data, mesh, what)
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


def _assemble_tasks(data: Mapping[str, Any], mesh: Mesh, what: str) -> dict[str, Any]:
    """Global arrays from each process's share (``make_array_from_process_local_data``)."""
    sharding = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    arrays = [key for key, value in data.items()
              if hasattr(value, "shape") and np.ndim(value) >= 1]
    counts = np.asarray([data[key].shape[0] for key in arrays], np.int64)
    every = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(arrays))
    out = dict(data)
    for column, key in enumerate(arrays):
        local = int(counts[column])
        if len(set(every[:, column].tolist())) > 1:
            raise InputError(
                f"{what}[{key!r}] holds {every[:, column].tolist()} tasks on processes "
                f"0..{len(every) - 1}; with a mesh over several processes each passes its "
                "share of the tasks, the same number on every process")
        if local % local_devices:
            raise InputError(
                f"{what}[{key!r}] has {local} tasks on process {jax.process_index()}, which "
                f"its {local_devices} devices cannot split evenly; use a multiple of "
                f"{local_devices} tasks per process")
        out[key] = jax.make_array_from_process_local_data(sharding, data[key])
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` whole on every device of the mesh (over several
    processes, each process's copy must hold the same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if not spans_processes(mesh):
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x)), local_view(tree))


def local_view(tree: Any) -> Any:
    """This process's part of every array of ``tree``, on the host: a replicated array's
    local copy, a task-split array's local tasks; arrays this process holds whole pass
    unchanged (so on one process this is the identity). Host arrays, not device ones, so
    that eager work on them commits to no device and its results can meet global arrays in
    a compiled call."""
    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            x, x.sharding.mesh, x.sharding.spec))
    return jax.tree.map(local, tree)


def gather_tasks(values: Any, mesh: Mesh | None) -> np.ndarray:
    """Per-task values computed on this process's tasks (:func:`local_view`), as one host
    array over all tasks in the global order (a collective over a mesh of several
    processes; a plain ``np.asarray`` otherwise)."""
    if not spans_processes(mesh):
        return np.asarray(values)
    return np.asarray(multihost_utils.process_allgather(np.asarray(values), tiled=True))


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` whole on the host: arrays split over processes are gathered
    (a collective), the others fetched as they are."""
    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable \
                and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x
    return jax.device_get(jax.tree.map(whole, tree))

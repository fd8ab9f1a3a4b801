"""The ``tasks`` plate: a :class:`numpyro.plate` that marks the task level of a model.

Sites outside it are global (θ and hyperparameters), latent sites inside it are task
parameters φ_j, observed sites inside it are task data (Grant et al., ICLR 2018, §3, the
hierarchical model of their Fig. 1). The plate behaves exactly like ``numpyro.plate``
(broadcasting, subsampling, scaling); the only difference is the type of the frame it
pushes on each site's ``cond_indep_stack``, so the handler can recognise the task level
without matching on names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.primitives import CondIndepStackFrame

from numpyro_hbmeta.validate import InputError


class TaskFrame(CondIndepStackFrame):
    """The ``CondIndepStackFrame`` of a :class:`tasks` plate (``size`` is the subsample size)."""

    __slots__ = ()


class _TaskBatch(NamedTuple):
    size: int
    indices: jnp.ndarray


# Set by drivers that slice the task axis of the data (``MetaEB.run(task_batch_size=...)``):
# the user's model builds its plate from the sliced data, so the plate is told here the
# full number of tasks (for the likelihood scale) and which tasks the slice holds.
_TASK_BATCH: contextvars.ContextVar[dict[str, _TaskBatch] | None] = contextvars.ContextVar(
    "hbmeta_task_batch", default=None
)


@contextlib.contextmanager
def task_batch(name: str, size: int, indices: jnp.ndarray) -> Iterator[None]:
    """Tell every ``tasks`` plate called ``name`` that the data hold the tasks ``indices``
    of ``size`` tasks in all, so log densities are scaled by ``size / len(indices)``."""
    current = dict(_TASK_BATCH.get() or {})
    current[name] = _TaskBatch(size, indices)
    token = _TASK_BATCH.set(current)
    try:
        yield
    finally:
        _TASK_BATCH.reset(token)


def is_task_frame(frame: CondIndepStackFrame) -> bool:
    return isinstance(frame, TaskFrame)


class tasks(numpyro.plate):  # noqa: N801 - a handler, named like numpyro's
    """The task plate.

    Args:
        size: number of tasks J (the leading axis of the data).
        name: plate name; also the name of the ``tasks`` dimension in ArviZ output.
        subsample_size: optional task minibatch size; as for any plate, sites inside are
            scaled by ``size / subsample_size``.
        dim: the batch dimension that indexes tasks (negative).

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from numpyro import handlers
        >>> def model():
        ...     with tasks(3):
        ...         numpyro.sample("phi", dist.Normal(0.0, 1.0))
        >>> tr = handlers.trace(handlers.seed(model, 0)).get_trace()
        >>> tr["phi"]["value"].shape, is_task_frame(tr["phi"]["cond_indep_stack"][0])
        ((3,), True)
    """

    def __init__(
        self,
        size: int,
        name: str = "tasks",
        *,
        subsample_size: int | None = None,
        dim: int | None = None,
    ) -> None:
        if isinstance(size, int | np.integer) and size < 1:  # numpyro's own check is a bare assert
            raise InputError(f"tasks plate {name!r}: size must be a positive number of tasks, "
                             f"got {size} (do the data hold no tasks?)")
        batch = (_TASK_BATCH.get() or {}).get(name)
        self._batch_indices = None
        if batch is not None:
            if size != batch.indices.shape[0]:
                raise InputError(
                    f"tasks plate {name!r}: the driver passed a batch of "
                    f"{batch.indices.shape[0]} tasks but the model built the plate with "
                    f"size={size}; build it from the data, e.g. hbm.tasks(x.shape[0])"
                )
            if subsample_size is not None:
                raise InputError(
                    f"tasks plate {name!r}: subsample_size={subsample_size} cannot be combined "
                    "with a driver's task_batch_size"
                )
            self._batch_indices = batch.indices
            size, subsample_size = batch.size, batch.indices.shape[0]
        super().__init__(name, size, subsample_size=subsample_size, dim=dim)

    def _subsample(self, name, size, subsample_size, dim):
        if self._batch_indices is None:
            return numpyro.plate._subsample(name, size, subsample_size, dim)
        with numpyro.handlers.substitute(data={name: self._batch_indices}):
            return numpyro.plate._subsample(name, size, subsample_size, dim)

    def process_message(self, msg) -> None:
        try:
            super().process_message(msg)
        except ValueError as err:  # numpyro's broadcast error does not name the site
            batch_shape = tuple(getattr(msg.get("fn"), "batch_shape", ()))
            raise InputError(
                f"site {msg.get('name')!r} inside tasks plate {self.name!r}: expected "
                f"{self.subsample_size} tasks at batch dim {self.dim}, got batch shape "
                f"{batch_shape} ({err})") from err
        stack = msg.get("cond_indep_stack")
        if stack and stack[-1].name == self.name and type(stack[-1]) is CondIndepStackFrame:
            stack[-1] = TaskFrame(*stack[-1])

    @classmethod
    def _reenter(cls, name: str, size: int, subsample_size: int, dim: int,
                 indices: jnp.ndarray) -> tasks:
        """A plate instance with the given subsample ``indices`` (the handler emits its
        per-task factor in it, so it is scaled and indexed like the model's task sites)."""
        plate = cls.__new__(cls)
        plate._batch_indices = indices
        numpyro.plate.__init__(plate, name, size, subsample_size=subsample_size, dim=dim)
        return plate

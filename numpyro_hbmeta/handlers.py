"""The ``tasks`` plate: a :class:`numpyro.plate` that marks the task level of a model.

Sites outside it are global (θ and hyperparameters), latent sites inside it are task
parameters φ_j, observed sites inside it are task data (Grant et al., ICLR 2018, §3, the
hierarchical model of their Fig. 1). The plate behaves exactly like ``numpyro.plate``
(broadcasting, subsampling, scaling); the only difference is the type of the frame it
pushes on each site's ``cond_indep_stack``, so the handler can recognise the task level
without matching on names.
"""

from __future__ import annotations

import numpy as np
import numpyro
from numpyro.primitives import CondIndepStackFrame

from numpyro_hbmeta.validate import InputError


class TaskFrame(CondIndepStackFrame):
    """The ``CondIndepStackFrame`` of a :class:`tasks` plate (``size`` is the subsample size)."""

    __slots__ = ()


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
        super().__init__(name, size, subsample_size=subsample_size, dim=dim)

    def process_message(self, msg) -> None:
        try:
            super().process_message(msg)
        except ValueError as err:  # numpyro's broadcast error does not name the site
            batch_shape = tuple(getattr(msg.get("fn"), "batch_shape", ()))
            raise InputError(
                f"site {msg.get('name')!r} inside tasks plate {self.name!r}: expected "
                f"{self.subsample_size} tasks at batch dim {self.dim}, got batch shape "
                f"{batch_shape} ({err}); build the plate from the data, e.g. "
                "hbm.tasks(x.shape[0]), so that it follows a batch of tasks") from err
        stack = msg.get("cond_indep_stack")
        if stack and stack[-1].name == self.name and type(stack[-1]) is CondIndepStackFrame:
            stack[-1] = TaskFrame(*stack[-1])

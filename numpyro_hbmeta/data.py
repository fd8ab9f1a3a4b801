"""Task-major data containers shared by the model zoo, the drivers and the command line.

Data are task-major: the leading axis of every array is the task, the second (where there
is one) the point within the task, as in ``x: (tasks, points, features)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["TaskData", "concat_points", "sample_task_batch", "take_tasks"]


class TaskData(NamedTuple):
    """What a zoo model's ``load_data`` returns.

    Attributes:
        support: keyword arguments of the model for the support (adaptation) set.
        query: keyword arguments for the query (held-out) set, or ``None``.
        task_labels: one label per task, used as the ArviZ ``tasks`` coordinate.
        truth: the simulation's parameter values by site name, or ``None`` for real data.
    """

    support: dict[str, Any]
    query: dict[str, Any] | None = None
    task_labels: list[str] | None = None
    truth: dict[str, Any] | None = None

    def all_data(self) -> dict[str, Any]:
        """Support and query joined along the points axis (the data a statistician fits)."""
        return self.support if self.query is None else concat_points(self.support, self.query)

    @classmethod
    def from_points(cls, points: Mapping[str, Any], num_support: int, *,
                    truth: dict[str, Any] | None = None) -> TaskData:
        """Split every ``(tasks, points, ...)`` array at ``num_support`` along the points axis.

        The first ``num_support`` points of each task are its support set, the rest its query
        set (``None`` when there are none); tasks are labelled ``task0, task1, ...``.

        Examples:
            >>> import jax.numpy as jnp
            >>> data = TaskData.from_points({"y": jnp.zeros((3, 5))}, 2)
            >>> data.support["y"].shape, data.query["y"].shape, data.task_labels[-1]
            ((3, 2), (3, 3), 'task2')
        """
        arrays = {key: jnp.asarray(value) for key, value in points.items()}
        num_tasks, num_points = next(iter(arrays.values())).shape[:2]
        if not 0 < num_support <= num_points:
            raise ValueError(f"num_support must be in [1, {num_points}] (points per task), "
                             f"got {num_support}")
        support = {key: value[:, :num_support] for key, value in arrays.items()}
        query = ({key: value[:, num_support:] for key, value in arrays.items()}
                 if num_support < num_points else None)
        return cls(support=support, query=query,
                   task_labels=[f"task{j}" for j in range(num_tasks)], truth=truth)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def concat_points(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Join two task-major data dicts along axis 1 (points); other entries must agree."""
    out = {}
    for key, value in first.items():
        other = second.get(key)
        if _is_array(value) and jnp.ndim(value) >= 2 and other is not None:
            out[key] = jnp.concatenate([jnp.asarray(value), jnp.asarray(other)], axis=1)
        else:
            out[key] = value
    return out


def take_tasks(data: Mapping[str, Any], indices: jnp.ndarray) -> dict[str, Any]:
    """Slice the task axis of every array in ``data`` (non-arrays pass unchanged)."""
    return {
        key: jnp.take(jnp.asarray(value), indices, axis=0)
        if _is_array(value) and jnp.ndim(value) >= 1
        else value
        for key, value in data.items()
    }


def sample_task_batch(rng_key, num_tasks: int, batch_size: int) -> jnp.ndarray:
    """``batch_size`` distinct task indices, a uniformly random subset of ``num_tasks``.

    Floyd's algorithm (Bentley & Floyd 1987, "A sample of brilliance"): for j = J − B, ..., J − 1
    draw t uniform in {0, ..., j} and keep t, or j when t is already kept. Every B-subset is
    equally likely, and the work is O(B²) comparisons whatever J is, where
    ``jax.random.choice(..., replace=False)`` permutes all J indices (at J = 10⁶ that
    permutation was 99 % of a batched Laplace-EB step). The order within the batch is not
    random; nothing downstream depends on it (the loss is a sum, per-task random numbers are
    keyed by the task's own index).
    """
    offsets = jnp.arange(batch_size)
    draws = jax.random.randint(rng_key, (batch_size,), 0, num_tasks - batch_size + offsets + 1)

    def keep(k, kept):
        candidate = draws[k]
        taken = jnp.any((kept == candidate) & (offsets < k))
        return kept.at[k].set(jnp.where(taken, num_tasks - batch_size + k, candidate))

    return jax.lax.fori_loop(0, batch_size, keep, jnp.zeros(batch_size, draws.dtype))

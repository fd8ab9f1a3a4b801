"""Fresh episodes for ``MetaEB.run(task_source=...)``: a function or an iterator.

A task source is either a function ``(rng_key, step) -> (support, query)``, called with
``fold_in(key_source, step)``, or an iterator of ``(support, query)`` pairs. Each pair is
validated like fixed data (:func:`~numpyro_hbmeta.validate.task_data`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax

from numpyro_hbmeta import validate

__all__ = ["Episodes", "TaskSource"]

TaskSource = Callable[[jax.Array, int], tuple[dict, dict | None]] | Iterator


class Episodes:
    """A ``task_source``: a function ``(key, step) -> (support, query)`` or an iterator."""

    def __init__(self, source: TaskSource, key) -> None:
        self.key = key
        self.function = source if callable(source) and not isinstance(source, Iterator) \
            else None
        self.iterator = None if self.function is not None else iter(source)
        self._held: tuple[int, Any] | None = None

    def get(self, step: int):
        if self.function is not None:
            out = self.function(jax.random.fold_in(self.key, step), step)
        elif self._held is not None and self._held[0] == step:
            out = self._held[1]
        else:
            try:
                out = next(self.iterator)
            except StopIteration:
                raise ValueError(f"task_source ran out of episodes at step {step}") from None
            self._held = (step, out)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"task_source must give (support, query) pairs; at step {step} it "
                            f"gave {type(out).__name__}")
        support, query = out
        return (validate.task_data(support, "task_source support"),
                None if query is None else validate.task_data(query, "task_source query"))

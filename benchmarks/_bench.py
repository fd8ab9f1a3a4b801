"""Shared measuring helpers of the benchmark scripts (not a benchmark itself).

Structural measures come from XLA's compiled program: FLOPs and bytes accessed from
``cost_analysis()`` (a ``while_loop`` body, e.g. a Newton solve, is counted once, not once
per iteration) and buffer sizes from ``memory_analysis()``. Timings are taken in interleaved
rounds in one process and the best round is kept, so a ratio compares like with like on a
shared machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


def compiled_costs(compiled) -> dict[str, float]:
    """FLOPs, bytes accessed and buffer sizes (bytes) of a ``jax.stages.Compiled``."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per device
        cost = cost[0]
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", np.nan)),
        "bytes_accessed": float(cost.get("bytes accessed", np.nan)),
        "temp_bytes": float(memory.temp_size_in_bytes),
        "argument_bytes": float(memory.argument_size_in_bytes),
        "output_bytes": float(memory.output_size_in_bytes),
    }


def log_log_slope(x, y) -> float:
    """Least-squares exponent b of y ≈ a·x^b (NaN with fewer than two usable points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def time_call(fn: Callable[[], object], *, min_calls: int = 3, min_seconds: float = 0.2
              ) -> float:
    """Median seconds per call of ``fn`` (already compiled), over at least ``min_calls``
    calls and ``min_seconds``; each call is waited for."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def interleaved_best(fns: Mapping[str, Callable[[], object]], *, rounds: int = 3,
                     min_calls: int = 3, min_seconds: float = 0.2) -> dict[str, float]:
    """Seconds per call of each function: one median per round, rounds interleaved over the
    functions, the best (smallest) round kept."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], time_call(fn, min_calls=min_calls,
                                                   min_seconds=min_seconds))
    return best


#: jax.monitoring duration events that together make up "compile": tracing to a jaxpr,
#: lowering to MLIR and XLA's backend compile.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, summed from ``jax.monitoring``
    events since :meth:`reset` (register once per process with :meth:`install`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self.phases = dict.fromkeys(("trace", "lower", "compile"), 0.0)

    def install(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0
        self.phases = dict.fromkeys(self.phases, 0.0)

    def _listen(self, event: str, duration: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.count += event == COMPILE_EVENTS[-1]
            self.phases[("trace", "lower", "compile")[COMPILE_EVENTS.index(event)]] += duration


def max_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """One line: date, CPU count, load average, JAX version and backend."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs "
            f"({platform.machine()}), load average {load}, jax {jax.__version__} "
            f"on {jax.default_backend()}")

"""Cost of one Laplace-EB step as the number of tasks J grows, with and without a task batch.

The zoo's hierarchical linear regression (``linear.simulate(key, num_tasks=J,
num_support=10)``, 2 features), ``MetaEB(linear.model, inner=Newton(), objective="laplace",
optimizer=optax.adam(0.05))``, its public ``update`` jitted once per J. For J = 10², 10³, …
up to ``--max-tasks`` (default 10⁵), the full step and the step on ``--batch`` (default 256)
tasks drawn without replacement:

* time per step (median of the calls of a round, best of ``--rounds`` interleaved rounds),
* FLOPs and bytes accessed of the compiled step (``cost_analysis``; the Newton
  ``while_loop`` body counts once),
* temporary and argument buffers of the compiled step (``memory_analysis``),
* the same for ``jax.random.choice(key, J, (batch,), replace=False)`` alone, which is how the
  batch is drawn today (it permutes all J indices),

and the fitted exponents b of cost ∝ J^b (log-log least squares). DESIGN.md's target: a step
costs what its task batch costs, so the batched step should not grow with J (issue 12: at
J = 10⁶ within 2× of J = 10³).

    python benchmarks/scale_tasks.py [--max-tasks 100000] [--batch 256] [--rounds 3]
    python benchmarks/scale_tasks.py --min-tasks 1000 --max-tasks 1000000 --batch-only
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import optax
from _bench import (
    compiled_costs,
    interleaved_best,
    log_log_slope,
    machine,
    max_rss_mib,
)

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


def task_counts(min_tasks: int, max_tasks: int) -> list[int]:
    """The powers of ten from ``min_tasks`` to ``max_tasks``."""
    low, high = (int(math.log10(n) + 1e-9) for n in (min_tasks, max_tasks))
    return [10 ** k for k in range(low, high + 1)]


def compile_step(driver: hbm.MetaEB, state, support, batch: int | None):
    """The driver's public update, jitted and compiled for this J and batch; seconds taken."""
    step = jax.jit(driver.update, static_argnames=("task_batch_size",))
    start = time.perf_counter()
    compiled = step.lower(state, jax.random.PRNGKey(3), support, None,
                          task_batch_size=batch).compile()
    return compiled, time.perf_counter() - start


def compile_choice(num_tasks: int, batch: int):
    def draw(key):
        return jax.random.choice(key, num_tasks, (batch,), replace=False)

    return jax.jit(draw).lower(jax.random.PRNGKey(0)).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-tasks", type=int, default=100)
    parser.add_argument("--max-tasks", type=int, default=100_000)
    parser.add_argument("--batch-only", action="store_true",
                        help="skip the full step (e.g. with --max-tasks 1000000)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.adam(0.05))
    rows, calls = [], {}
    for num_tasks in task_counts(args.min_tasks, args.max_tasks):
        data = linear.simulate(jax.random.PRNGKey(0), num_tasks=num_tasks, num_support=10)
        state = driver.init(jax.random.PRNGKey(1), data.support)
        key = jax.random.PRNGKey(2)
        for batch in ((args.batch,) if args.batch_only else (None, args.batch)):
            if batch is not None and batch >= num_tasks:
                continue
            compiled, seconds = compile_step(driver, state, data.support, batch)
            row = {"J": num_tasks, "batch": batch or num_tasks, "mode": "batch" if batch
                   else "full", "compile_s": seconds, **compiled_costs(compiled)}
            if batch is not None:
                choice = compile_choice(num_tasks, batch)
                row["choice_flops"] = compiled_costs(choice)["flops"]
                calls[("choice", num_tasks)] = (lambda c=choice, k=key: c(k))
            calls[(row["mode"], num_tasks)] = (
                lambda c=compiled, s=state, k=key, d=data.support: c(s, k, d, None))
            rows.append(row)
            print(f"  compiled J={num_tasks:>8} {row['mode']:5} in {seconds:5.1f} s", flush=True)

    seconds = interleaved_best(calls, rounds=args.rounds)
    for row in rows:
        row["step_ms"] = 1e3 * seconds[(row["mode"], row["J"])]
        if row["mode"] == "batch":
            row["choice_ms"] = 1e3 * seconds[("choice", row["J"])]

    print(f"\nLaplace-EB step (Newton inner, linear model, 10 support points per task); "
          f"{machine()}")
    print(f"{'J':>8} {'mode':>6} {'step ms':>9} {'MFLOP':>9} {'MB accessed':>11} "
          f"{'temp MB':>8} {'args MB':>8} {'choice ms':>9} {'choice MFLOP':>12}")
    for row in rows:
        choice = (f"{row['choice_ms']:9.3f} {row['choice_flops'] / 1e6:12.3f}"
                  if row["mode"] == "batch" else f"{'':9} {'':12}")
        print(f"{row['J']:>8} {row['mode']:>6} {row['step_ms']:9.3f} "
              f"{row['flops'] / 1e6:9.2f} {row['bytes_accessed'] / 1e6:11.2f} "
              f"{row['temp_bytes'] / 1e6:8.2f} {row['argument_bytes'] / 1e6:8.2f} {choice}")

    print("\nexponent b of cost ∝ J^b (log-log least squares over the J above)")
    for mode in ("full", "batch"):
        part = [r for r in rows if r["mode"] == mode]
        if not part:
            continue
        js = [r["J"] for r in part]
        print(f"  {mode:5}: time {log_log_slope(js, [r['step_ms'] for r in part]):5.2f}   "
              f"FLOPs {log_log_slope(js, [r['flops'] for r in part]):5.2f}   "
              f"bytes {log_log_slope(js, [r['bytes_accessed'] for r in part]):5.2f}   "
              f"temp memory {log_log_slope(js, [r['temp_bytes'] for r in part]):5.2f}")
    batched = {r["J"]: r for r in rows if r["mode"] == "batch"}
    if 1000 in batched:
        base = batched[1000]
        for num_tasks, row in batched.items():
            if num_tasks > 1000:  # the batched step's growth (issue 12)
                print(f"  batch step J={num_tasks} / J=1000: time "
                      f"{row['step_ms'] / base['step_ms']:.2f}x, FLOPs "
                      f"{row['flops'] / base['flops']:.2f}x (target ≤ 2x at J=10⁶)")
    print(f"peak RSS of the process: {max_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

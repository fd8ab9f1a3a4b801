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

``--whole-run`` instead times ``MetaEB.run`` itself, one fresh process per J (so each peak
RSS is that J's own): the batched steps (``final_checks=False``, after a warm-up run that
compiles them), then a whole run with its end-of-run checks (outer convergence, the boundary
check's full-data losses), and the checks alone once more when compiled. Per J: ms per step
(from runs of 50 and 50 + ``--steps`` steps, best of three each, so that run's once-per-call
O(J) setup, the data validation, is apart: "setup s"), whole-run seconds, check seconds
(first with compilation, then warm ``boundary_sites``), and peak RSS after the data, after
the steps and after the checks.

    python benchmarks/scale_tasks.py [--max-tasks 100000] [--batch 256] [--rounds 3]
    python benchmarks/scale_tasks.py --min-tasks 1000 --max-tasks 1000000 --batch-only
    python benchmarks/scale_tasks.py --whole-run --min-tasks 1000 --max-tasks 1000000 \
        --batch 256 --steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings

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


def one_run(num_tasks: int, batch: int, steps: int) -> dict[str, float]:
    """MetaEB.run on J tasks with a task batch: step time, run time, check time, peak RSS."""
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.adam(0.05))
    support = linear.simulate(jax.random.PRNGKey(0), num_tasks=num_tasks,
                              num_support=10).support
    jax.block_until_ready(support)
    row = {"J": num_tasks, "batch": batch, "steps": steps, "rss_data_mib": max_rss_mib()}
    kwargs = {"task_batch_size": batch, "progress_bar": False}
    warnings.simplefilter("ignore")  # "not converged" after a short run: not the point here
    driver.run(jax.random.PRNGKey(1), 50, support, final_checks=False, **kwargs)  # compiles
    seconds = {50: math.inf, 50 + steps: math.inf}
    for _ in range(3):  # best of three; the difference: steps alone, without run's O(J) setup
        for num_steps in seconds:
            start = time.perf_counter()
            driver.run(jax.random.PRNGKey(1), num_steps, support, final_checks=False, **kwargs)
            seconds[num_steps] = min(seconds[num_steps], time.perf_counter() - start)
    row["step_ms"] = 1e3 * (seconds[50 + steps] - seconds[50]) / steps
    row["setup_s"] = seconds[50] - 50e-3 * row["step_ms"]
    row["rss_steps_mib"] = max_rss_mib()
    start = time.perf_counter()
    result = driver.run(jax.random.PRNGKey(1), steps, support, **kwargs)
    row["run_s"] = time.perf_counter() - start
    row["checks_s"] = row["run_s"] - 1e-3 * row["step_ms"] * steps - row["setup_s"]
    row["rss_checks_mib"] = max_rss_mib()
    start = time.perf_counter()
    driver.boundary_sites(result.params, support)
    row["checks_warm_s"] = time.perf_counter() - start
    return row


def whole_runs(args) -> None:
    rows = []
    for num_tasks in task_counts(args.min_tasks, args.max_tasks):
        out = subprocess.run(
            [sys.executable, __file__, "--one-run", str(num_tasks), "--batch", str(args.batch),
             "--steps", str(args.steps)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  J={num_tasks:>8} done", flush=True)
    print(f"\nMetaEB.run, Laplace EB (Newton inner, linear model, 10 support points per task), "
          f"task batch {args.batch}, {args.steps} steps; {machine()}")
    print(f"{'J':>8} {'step ms':>8} {'setup s':>8} {'run s':>7} {'checks s':>9} {'warm s':>7} "
          f"{'RSS data':>9} {'RSS steps':>10} {'RSS checks':>11}  (MiB)")
    for r in rows:
        print(f"{r['J']:>8} {r['step_ms']:8.2f} {r['setup_s']:8.2f} {r['run_s']:7.2f} "
              f"{r['checks_s']:9.2f} "
              f"{r['checks_warm_s']:7.2f} {r['rss_data_mib']:9.0f} {r['rss_steps_mib']:10.0f} "
              f"{r['rss_checks_mib']:11.0f}")
    base = next((r for r in rows if r["J"] == 1000), None)
    if base is not None:
        for r in rows:
            if r["J"] > 1000:
                print(f"  J={r['J']} / J=1000: step time {r['step_ms'] / base['step_ms']:.2f}x, "
                      f"peak RSS over the steps {r['rss_steps_mib'] / base['rss_steps_mib']:.2f}x"
                      f", with the checks {r['rss_checks_mib'] / base['rss_checks_mib']:.2f}x "
                      "(target ≤ 2x at J=10⁶)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-tasks", type=int, default=100)
    parser.add_argument("--max-tasks", type=int, default=100_000)
    parser.add_argument("--batch-only", action="store_true",
                        help="skip the full step (e.g. with --max-tasks 1000000)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--whole-run", action="store_true",
                        help="time MetaEB.run (steps, end-of-run checks, peak RSS), one "
                             "process per J")
    parser.add_argument("--steps", type=int, default=500, help="steps of --whole-run")
    parser.add_argument("--one-run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.one_run, args.batch, args.steps)))
        return
    if args.whole_run:
        whole_runs(args)
        return

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

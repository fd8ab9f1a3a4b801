"""Cost of one meta-learning step with the tasks sharded over 1, 2 and 4 devices.

``MetaEB(..., mesh=Mesh(devices[:n], ("tasks",)))`` splits every task-major array over the
n devices of the ``"tasks"`` axis and replicates the globals; inside ``jax.jit`` each device
runs the inner solves and per-task objectives of its own J / n tasks, and the meta-gradient
∇_θ Σ_j objective_j(θ) becomes n partial sums joined by one all-reduce. Ideally a step
therefore costs ≈ 1/n of the one-device step plus the all-reduce of the globals' gradient
(a few numbers for the linear model). With ``task_batch_size`` B the step draws B of the J
tasks: a gather from sharded data that XLA lowers to collectives, after which the driver
splits the batch over the devices again (B / n tasks each; B must be a multiple of n).

Problems (``--problem``):

* ``linear-laplace`` (default): the zoo's hierarchical linear regression (2 features, 10
  support points per task), ``MetaEB(linear.model, inner=Newton(), objective="laplace")``:
  Laplace empirical Bayes, cheap per task (2×2 Newton solves).
* ``linear-maml``: the same data with 10 query points, ``TruncatedGD(5, 0.002)``, MAML.
* ``sinusoid-maml``: the zoo's sinusoid (1-40-40-1 ReLU net, 1761 weights per task, 10 shots
  + 10 query points), ``TruncatedGD(5, 0.003)``, MAML: much more work per task.

For n in ``--devices`` (default 1, 2, 4; counts beyond the devices present are skipped) the
public ``update`` is jitted and compiled for the full step and for a ``--batch`` task batch,
and the script reports, all in this one process:

* time per step after compilation (median of the calls of a round, best of ``--rounds``
  rounds interleaved over every configuration, each call waited for with
  ``block_until_ready``) and the speed-up t(1 device) / t(n devices);
* FLOPs and temporary buffers of the compiled step per device (``cost_analysis``,
  ``memory_analysis`` of the partitioned program): these show whether the work really was
  split, whatever the timing noise;
* max |Δ| of the unconstrained globals after ``--check-steps`` updates against the
  one-device run from the same start and keys (only the order of the sum over tasks
  differs, so a float32 rounding difference is expected, not zero).

Devices. On CPU the script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(N = the largest of ``--devices``, appended to any XLA_FLAGS already set) before JAX starts,
giving N host devices that share the machine's cores: a speed-up is bounded by the number
of cores, not by N. ``--no-force-host-devices`` leaves XLA_FLAGS alone. On a host with GPUs
(or TPUs) the default backend's real devices are used; the flag only concerns the CPU
platform and does no harm there. ``--platform cpu`` measures host devices even then.

    python benchmarks/scale_devices.py                  # 4 forced host devices on CPU
    python benchmarks/scale_devices.py --quick          # a smoke run (linear-maml), < 30 s
    python benchmarks/scale_devices.py --problem sinusoid-maml --tasks 1024 --batch 256
    python benchmarks/scale_devices.py --devices 1 2 4 8 --tasks 65536   # a multi-GPU host
"""

from __future__ import annotations

import argparse
import os
import sys
import time

FORCE_FLAG = "--xla_force_host_platform_device_count"
PROBLEMS = ("linear-laplace", "linear-maml", "sinusoid-maml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="On a multi-GPU host `python benchmarks/scale_devices.py` uses the real GPUs.")
    parser.add_argument("--problem", choices=PROBLEMS, default=None,
                        help="default linear-laplace (linear-maml with --quick: it compiles "
                             "faster)")
    parser.add_argument("--tasks", type=int, default=4096,
                        help="number of tasks J (a multiple of every device count)")
    parser.add_argument("--batch", type=int, default=512,
                        help="task_batch_size B of the batched step (0: full step only)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4],
                        help="device counts n (the first is the baseline of the ratios)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds (the best one is kept)")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="least time spent calling one configuration per round")
    parser.add_argument("--check-steps", type=int, default=5,
                        help="updates compared against the first device count's run")
    parser.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto",
                        help="whose devices: auto = the default backend's")
    parser.add_argument("--no-force-host-devices", action="store_true",
                        help=f"do not set XLA_FLAGS={FORCE_FLAG}=N")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: J = 512, B = 128, one short round (overrides "
                             "--tasks, --batch, --rounds, --min-seconds, --check-steps)")
    return parser


def force_host_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices (before JAX starts; a count already set wins)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FORCE_FLAG}={count}".strip()


# The device count is fixed when JAX starts, so the flags are read before jax is imported.
ARGS = build_parser().parse_args() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.no_force_host_devices and ARGS.platform in ("auto", "cpu"):
    force_host_devices(max(ARGS.devices))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _bench import compiled_costs, interleaved_best, machine, max_rss_mib  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import numpyro_hbmeta as hbm  # noqa: E402
from numpyro_hbmeta.models import linear, sinusoid  # noqa: E402


def problem(name: str, num_tasks: int):
    """(MetaEB keyword arguments without the mesh, support, query or None, init_params or
    None)."""
    key = jax.random.PRNGKey(0)
    if name == "sinusoid-maml":
        data = sinusoid.simulate(key, num_tasks=num_tasks, shots=10, num_query=10)
        driver = {"model": sinusoid.model, "inner": hbm.TruncatedGD(5, 0.003),
                  "objective": "maml", "optimizer": optax.adam(1e-2)}
        return driver, data.support, data.query, sinusoid.init_params(jax.random.PRNGKey(2))
    if name == "linear-maml":
        data = linear.simulate(key, num_tasks=num_tasks, num_support=10, num_query=10)
        driver = {"model": linear.model, "inner": hbm.TruncatedGD(5, 0.002),
                  "objective": "maml", "optimizer": optax.adam(0.05)}
        return driver, data.support, data.query, None
    data = linear.simulate(key, num_tasks=num_tasks, num_support=10)
    driver = {"model": linear.model, "inner": hbm.Newton(), "objective": "laplace",
              "optimizer": optax.adam(0.05)}
    return driver, data.support, None, None


def pick_devices(platform: str) -> list:
    """The devices to build meshes from: the default backend's, or the named platform's."""
    return list(jax.devices() if platform == "auto" else jax.devices(platform))


def setup(settings: dict, support, query, init_params, devices: list, batches: list):
    """Sharded data, replicated start and the compiled steps on ``devices``."""
    mesh = Mesh(np.asarray(devices), ("tasks",))
    driver = hbm.MetaEB(**settings, mesh=mesh)
    support, query = driver.shard(support, query)
    state = driver.init(jax.random.PRNGKey(1), support, query, init_params)
    # init replicates the state over the mesh, the layout update expects.
    assert state.step.sharding == NamedSharding(mesh, PartitionSpec()), state.step.sharding
    step = jax.jit(driver.update, static_argnames=("task_batch_size",))
    compiled = {batch: step.lower(state, jax.random.PRNGKey(3), support, query,
                                  task_batch_size=batch).compile() for batch in batches}
    return state, support, query, compiled


def globals_after(compiled, state, support, query, steps: int) -> dict[str, np.ndarray]:
    """Unconstrained globals after ``steps`` updates with keys fold_in(key, i)."""
    key = jax.random.PRNGKey(4)
    for i in range(steps):
        state, _ = compiled(state, jax.random.fold_in(key, i), support, query)
    return {name: np.asarray(value) for name, value in jax.device_get(state.params).items()}


def measure(args, devices: list, counts: list[int], batches: list) -> list[dict]:
    """Compile, check and time every (device count, step) pair; one row each."""
    settings, support, query, init_params = problem(args.problem, args.tasks)
    rows, calls, finals = [], {}, {}
    for n in counts:
        start = time.perf_counter()
        state, sup, qry, compiled = setup(settings, support, query, init_params, devices[:n],
                                          batches)
        print(f"  {n} device(s): {len(compiled)} step(s) compiled in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        for batch, program in compiled.items():
            mode = "full" if batch is None else "batch"
            finals[(n, mode)] = globals_after(program, state, sup, qry, args.check_steps)
            calls[(n, mode)] = (lambda c=program, s=state, d=sup, q=qry:
                                c(s, jax.random.PRNGKey(3), d, q))
            rows.append({"n": n, "mode": mode, "batch": batch or args.tasks,
                         **compiled_costs(program)})

    seconds = interleaved_best(calls, rounds=args.rounds, min_seconds=args.min_seconds)
    base = {row["mode"]: row for row in rows if row["n"] == counts[0]}
    for row in rows:
        row["ms"] = 1e3 * seconds[(row["n"], row["mode"])]
    for row in rows:
        ref = base[row["mode"]]
        row["speed_up"] = ref["ms"] / row["ms"]
        row["flop_ratio"] = row["flops"] / ref["flops"]
        ours, theirs = finals[(row["n"], row["mode"])], finals[(counts[0], row["mode"])]
        row["diff"] = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs)
    return rows


def report(rows: list[dict], args, devices: list, base_n: int) -> None:
    print(f"\n{'devices':>7} {'mode':>5} {'tasks':>6} {'ms/step':>9} {'speed-up':>8} "
          f"{'effic.':>6} {'MFLOP/dev':>9} {'FLOP ×':>6} {'temp MB/dev':>11} "
          f"{'max|Δθ|':>9}")
    for row in rows:
        print(f"{row['n']:>7} {row['mode']:>5} {row['batch']:>6} {row['ms']:9.3f} "
              f"{row['speed_up']:7.2f}x {row['speed_up'] * base_n / row['n']:6.2f} "
              f"{row['flops'] / 1e6:9.2f} {row['flop_ratio']:6.2f} "
              f"{row['temp_bytes'] / 1e6:11.2f} {row['diff']:9.2e}")

    print(f"\nspeed-up = t({base_n} device(s)) / t(n devices) in this process, best of "
          f"{args.rounds} interleaved round(s); effic. = speed-up × {base_n} / n. FLOP × = "
          f"FLOPs per device / the {base_n}-device step's, ≈ {base_n}/n when the work is "
          "split (approximate: XLA counts a loop body once and fuses a partitioned program "
          f"differently). max|Δθ| = unconstrained globals after {args.check_steps} steps "
          f"(same keys, so the same task batches) against the {base_n}-device run: only "
          "the order of the sum over tasks differs.")
    for mode in ("full", "batch"):
        unsplit = [r["n"] for r in rows if r["mode"] == mode and r["n"] > base_n
                   and r["flop_ratio"] > 0.9]
        if unsplit:
            print(f"note: the {mode} step's FLOPs per device do not fall with more devices "
                  f"(FLOP × > 0.9 on {unsplit} device(s)): its per-task work is not split "
                  "over the devices but repeated on each, in part or whole.")
    if devices[0].platform == "cpu" and max(r["n"] for r in rows) > 1:
        cores = os.cpu_count()
        forced = FORCE_FLAG in os.environ.get("XLA_FLAGS", "")
        print(f"CPU: these {len(devices)} devices are {'forced ' if forced else ''}host "
              f"devices sharing this machine's {cores} core(s) and whatever else runs on it, "
              f"so ≤ ~{min(cores, max(r['n'] for r in rows))}x is the best possible speed-up "
              "here, and cheap per-task work is dominated by the collectives and the "
              "synchronisation of the devices. For real scaling run this on a multi-GPU host.")
    print(f"peak RSS of the process: {max_rss_mib():.0f} MiB")


def main() -> None:
    args = ARGS
    if args.quick:
        args.problem = args.problem or "linear-maml"
        args.tasks, args.batch, args.rounds = 512, 128, 1
        args.min_seconds, args.check_steps = 0.1, 3
    args.problem = args.problem or "linear-laplace"
    devices = pick_devices(args.platform)
    counts = [n for n in args.devices if n <= len(devices)]
    skipped = [n for n in args.devices if n > len(devices)]
    if not counts:
        sys.exit(f"none of --devices {args.devices} fits the {len(devices)} device(s) present")
    bad = [n for n in counts if args.tasks % n]
    if bad:
        sys.exit(f"--tasks {args.tasks} is not a multiple of the device counts {bad}")
    batches: list[int | None] = [None]
    if 0 < args.batch < args.tasks:
        batches.append(args.batch)

    print(f"{args.problem}, J = {args.tasks} tasks, task batch {args.batch or 'none'}; "
          f"{len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}); "
          f"{machine()}")
    if skipped:
        print(f"skipped device counts {skipped}: only {len(devices)} device(s)")
    with jax.default_device(devices[0]):
        rows = measure(args, devices, counts, batches)
    report(rows, args, devices, counts[0])


if __name__ == "__main__":
    main()

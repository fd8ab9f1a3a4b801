"""Laplace empirical Bayes with the tasks split over two processes (``jax.distributed``).

Launches two processes on this machine's CPU (loopback only, gloo collectives), each holding
half of the tasks of the zoo's hierarchical linear regression, fits the globals with
``MetaEB(..., mesh="auto")`` for ``--steps`` steps, and prints θ from each process next to the
single-process fit on all tasks. In float64 they agree to ~1e-10 relative: the sum over tasks
is reduced in another order, nothing else differs.

    python examples/distributed_two_processes.py [--steps 60] [--json]

On a cluster the worker part is the whole program: ``jax.distributed.initialize()`` (the
coordinator comes from the cluster's environment), load this process's share of the tasks,
the same ``run`` call (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

NUM_PROCESSES = 2
NUM_TASKS = 8


def fit(num_steps: int, *, process_id: int | None):
    """θ̂, τ̂, σ̂ after ``num_steps`` Laplace-EB steps (and the first and last losses): all
    tasks in this process (``process_id=None``) or this process's share over a mesh of every
    process's devices."""
    import jax
    import optax

    import numpyro_hbmeta as hbm
    from numpyro_hbmeta.data import take_tasks
    from numpyro_hbmeta.models import linear

    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=NUM_TASKS, num_support=6)
    support = data.all_data()
    mesh = None
    if process_id is not None:  # a real job would read only its own files here
        share = NUM_TASKS // jax.process_count()
        support = take_tasks(support, jax.numpy.arange(share * process_id,
                                                       share * (process_id + 1)))
        mesh = "auto"
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace", mesh=mesh,
                        optimizer=optax.adam(1e-2))
    result = driver.run(jax.random.PRNGKey(1), num_steps, support, progress_bar=False)
    params = {name: jax.device_get(value).tolist() for name, value in result.params.items()}
    return {**params, "losses": [float(result.losses[0]), float(result.losses[-1])]}


def worker(port: int, process_id: int, num_steps: int) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=120)
    params = fit(num_steps, process_id=process_id)
    print("PARAMS " + json.dumps({"process": process_id, "params": params}), flush=True)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(num_steps: int, *, timeout: float = 600.0) -> list[dict]:
    """Start the processes, wait for them (killing all on a failure or after ``timeout``
    seconds) and return each one's fitted globals, by process id."""
    port = free_port()
    # One CPU device per process: a forced host device count is dropped, other flags kept.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--port",
                               str(port), "--steps", str(num_steps)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(NUM_PROCESSES)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            if proc.returncode:
                raise RuntimeError(f"process {procs.index(proc)} exited with "
                                   f"{proc.returncode}:\n{err[-4000:]}")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    found = [json.loads(line[len("PARAMS "):]) for out in outputs
             for line in out.splitlines() if line.startswith("PARAMS ")]
    return [entry["params"] for entry in sorted(found, key=lambda e: e["process"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.port, args.worker, args.steps)
        return
    processes = launch(args.steps)
    import jax

    jax.config.update("jax_enable_x64", True)
    reference = fit(args.steps, process_id=None)
    if args.json:
        print(json.dumps({"reference": reference, "processes": processes}))
        return
    for name in reference:
        print(f"{name}: one process {reference[name]}")
        for i, params in enumerate(processes):
            print(f"{' ' * len(name)}  process {i}/{NUM_PROCESSES} {params[name]}")


if __name__ == "__main__":
    main()

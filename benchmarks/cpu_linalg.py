"""Cost of :mod:`numpyro_hbmeta.curvature._linalg` (one LAPACK call per matrix) against
``jnp.linalg``.

jaxlib 0.10–0.11 split one batched LAPACK call over XLA's CPU thread pool; that split is what
deadlocks when several batched calls run at once (see
``numpyro_hbmeta/curvature/_linalg.py``), and what the library gives up. Two settings, each
timed interleaved, best of ``--repeats`` rounds:

- one batched eigh and one batched Cholesky of (tasks, n, n): the case where jaxlib's split
  can help, and the only one where ``jnp.linalg`` is safe to time (a single batched call cannot
  deadlock: the thread it blocks leaves the others free);
- K-FAC's pattern, log det of several layers' factors with its gradient, batched over tasks,
  through the library only (with ``jnp.linalg`` this is the program that hangs).

Prints milliseconds per call and the ratio ``numpyro_hbmeta.curvature._linalg / jnp.linalg``.

    python benchmarks/cpu_linalg.py [--tasks 32] [--n 128] [--calls 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature import kronecker as kfac


def spd(key, tasks: int, n: int) -> jnp.ndarray:
    x = jax.random.normal(key, (tasks, n, n + 2))
    return x @ jnp.swapaxes(x, -1, -2) / n + 0.1 * jnp.eye(n)


def ms_per_call(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = spd(jax.random.PRNGKey(0), args.tasks, args.n)
    single = {
        "eigh": (jax.jit(lambda m: linalg.eigh(m)[0]), jax.jit(lambda m: jnp.linalg.eigh(m)[0])),
        "cholesky": (jax.jit(linalg.cholesky), jax.jit(jnp.linalg.cholesky)),
    }
    sizes = ((197, 128), (129, 64), (65, 5))  # the fewshot MLP's layers (A: p×p, G: q×q)
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(sizes))
    factors = [kfac.KroneckerFactor(spd(keys[2 * i], args.tasks, p), spd(keys[2 * i + 1],
                                                                          args.tasks, q))
               for i, (p, q) in enumerate(sizes)]
    kfac_step = jax.jit(jax.value_and_grad(
        lambda fs: jnp.sum(sum(kfac.logdet(f, 1e-3) for f in fs))))
    best: dict[str, float] = {}
    for fn_pair in single.values():
        for fn in fn_pair:
            jax.block_until_ready(fn(x))
    jax.block_until_ready(kfac_step(factors))
    for _ in range(args.repeats):
        for name, (ours, theirs) in single.items():
            for label, fn in ((f"{name} ours", ours), (f"{name} jnp", theirs)):
                best[label] = min(best.get(label, float("inf")), ms_per_call(fn, (x,), args.calls))
        best["kfac"] = min(best.get("kfac", float("inf")),
                           ms_per_call(kfac_step, (factors,), args.calls))
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"batch of {args.tasks} matrices {args.n}×{args.n}, best of {args.repeats} × "
          f"{args.calls} calls")
    for name in single:
        ours, theirs = best[f"{name} ours"], best[f"{name} jnp"]
        print(f"  {name:9s} one batched call: library {ours:8.2f} ms, "
              f"jnp.linalg {theirs:8.2f} ms, ratio {ours / theirs:.2f}")
    print(f"  K-FAC log det + gradient, layers {sizes}, {args.tasks} tasks: "
          f"{best['kfac']:.1f} ms per call (the library's linalg only: jnp.linalg can hang)")


if __name__ == "__main__":
    main()

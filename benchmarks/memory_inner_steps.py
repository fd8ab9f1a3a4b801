"""Memory of second-order MAML against the number of inner steps K, with and without
checkpointing.

The zoo's sinusoid model (1-40-40-1 ReLU net, 1761 weights per task), its default data (25
tasks, 10 support + 10 query points), ``MetaEB(sinusoid.model, inner=TruncatedGD(K, β),
objective="maml", optimizer=optax.adam(1e-2))`` with β = 0.003, and the same with
``TruncatedGD(K, β, checkpoint=True)``. For each K the public ``update`` is jitted and
compiled (not run) and XLA's ``memory_analysis()`` gives the temporary buffers of the step
(what the backward pass through the inner loop keeps alive); ``cost_analysis()`` gives its
FLOPs (a ``scan`` body counts once). Prints the table, the fitted exponent b of
temp ∝ K^b over K ≥ 5, and the bytes each extra inner step adds (least-squares slope).
DESIGN.md's target: second-order memory that does not grow with K when checkpointing is asked.

    python benchmarks/memory_inner_steps.py [--steps 1,2,5,10,20,50,100]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from _bench import compiled_costs, log_log_slope, machine

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import sinusoid

STEP_SIZE = 0.003


def step_costs(num_steps: int, checkpoint: bool, data) -> dict[str, float]:
    inner = hbm.TruncatedGD(num_steps, STEP_SIZE, checkpoint=checkpoint)
    driver = hbm.MetaEB(sinusoid.model, inner=inner, objective="maml",
                        optimizer=optax.adam(1e-2))
    state = driver.init(jax.random.PRNGKey(1), data.support, data.query,
                        sinusoid.init_params(jax.random.PRNGKey(2)))
    start = time.perf_counter()
    compiled = jax.jit(driver.update).lower(state, jax.random.PRNGKey(3), data.support,
                                            data.query).compile()
    return {"compile_s": time.perf_counter() - start, **compiled_costs(compiled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,5,10,20,50,100",
                        help="comma-separated inner step counts K")
    args = parser.parse_args()
    steps = [int(k) for k in args.steps.split(",")]
    data = sinusoid.load_data()

    rows = []
    for num_steps in steps:
        for checkpoint in (False, True):
            row = {"K": num_steps, "checkpoint": checkpoint,
                   **step_costs(num_steps, checkpoint, data)}
            rows.append(row)
            print(f"  compiled K={num_steps:>4} checkpoint={checkpoint!s:5} in "
                  f"{row['compile_s']:5.1f} s", flush=True)

    print(f"\nsecond-order MAML step, sinusoid 1-40-40-1, 25 tasks, 10+10 points; {machine()}")
    print(f"{'K':>5} {'temp MB':>9} {'temp MB ckpt':>12} {'ratio':>6} {'MFLOP':>9} "
          f"{'MFLOP ckpt':>10}")
    plain = {r["K"]: r for r in rows if not r["checkpoint"]}
    ckpt = {r["K"]: r for r in rows if r["checkpoint"]}
    for k in steps:
        print(f"{k:>5} {plain[k]['temp_bytes'] / 1e6:9.2f} {ckpt[k]['temp_bytes'] / 1e6:12.2f} "
              f"{ckpt[k]['temp_bytes'] / plain[k]['temp_bytes']:6.2f} "
              f"{plain[k]['flops'] / 1e6:9.1f} {ckpt[k]['flops'] / 1e6:10.1f}")

    large = [k for k in steps if k >= 5]
    print("\ntemp memory vs K: exponent b (temp ∝ K^b, K ≥ 5) and bytes per extra step")
    for name, table in (("plain", plain), ("checkpoint", ckpt)):
        temp = [table[k]["temp_bytes"] for k in large]
        per_step = np.polyfit(large, temp, 1)[0] if len(large) > 1 else float("nan")
        print(f"  {name:10}: b = {log_log_slope(large, temp):5.2f}, "
              f"{per_step / 1e3:8.1f} kB per step, K={steps[-1]} / K={steps[0]}: "
              f"{table[steps[-1]]['temp_bytes'] / table[steps[0]]['temp_bytes']:.1f}x")
    print(f"  one task batch of φ (25 × 1761 float32): {25 * sinusoid.NUM_PARAMS * 4 / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

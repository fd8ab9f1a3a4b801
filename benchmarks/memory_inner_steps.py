"""Memory of second-order MAML against the number of inner steps K, with and without
checkpointing.

The zoo's sinusoid model (1-40-40-1 ReLU net, 1761 weights per task), its default data (25
tasks, 10 support + 10 query points), ``MetaEB(sinusoid.model, inner=TruncatedGD(K, β),
objective="maml", optimizer=optax.adam(1e-2))`` with β = 0.003, and the same with
``TruncatedGD(K, β, checkpoint=True)``. For each K the public ``update`` is jitted and
compiled (not run) and XLA's ``memory_analysis()`` gives the temporary buffers of the step
(what the backward pass through the inner loop keeps alive); ``cost_analysis()`` gives its
FLOPs (a ``scan`` body counts once, so the column does not grow with K). Prints the table and,
for the plain and the checkpointed loop, the fitted exponent b of temp ∝ K^b over K ≥ 5,
the exponent of the part that grows with K (temp(K) − temp(1), which strips the step's
K-independent buffers) and the bytes each extra inner step adds (least-squares slope).

``checkpoint=True`` is two-level checkpointing (``TruncatedGD``'s docstring): ⌊K/L⌋ segments
of L = ⌊√K⌋ steps, a remainder of K mod L, so the temporaries should grow like K^0.5 where the
plain loop's grow like K^1. The "split" column shows segments × L + remainder. With
``--time`` it also runs each compiled step and prints its time (median of calls, best of
interleaved rounds), the price of the recomputation.

    python benchmarks/memory_inner_steps.py [--steps 1,2,5,10,20,50,100] [--time]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np
import optax
from _bench import compiled_costs, interleaved_best, log_log_slope, machine

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import sinusoid

STEP_SIZE = 0.003


def step_costs(num_steps: int, checkpoint: bool, data, timed: dict | None = None
               ) -> dict[str, float]:
    inner = hbm.TruncatedGD(num_steps, STEP_SIZE, checkpoint=checkpoint)
    driver = hbm.MetaEB(sinusoid.model, inner=inner, objective="maml",
                        optimizer=optax.adam(1e-2))
    state = driver.init(jax.random.PRNGKey(1), data.support, data.query,
                        sinusoid.init_params(jax.random.PRNGKey(2)))
    start = time.perf_counter()
    compiled = jax.jit(driver.update).lower(state, jax.random.PRNGKey(3), data.support,
                                            data.query).compile()
    if timed is not None:
        args = (state, jax.random.PRNGKey(3), data.support, data.query)
        timed[num_steps, checkpoint] = lambda: compiled(*args)
    return {"compile_s": time.perf_counter() - start, **compiled_costs(compiled)}


def split(num_steps: int) -> str:
    """The checkpointed loop's segments: "S×L+R" (TruncatedGD's two-level checkpointing)."""
    if num_steps == 0:
        return "-"
    seg_len = math.isqrt(num_steps)
    num_segments, remainder = divmod(num_steps, seg_len)
    return f"{num_segments}x{seg_len}" + (f"+{remainder}" if remainder else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,5,10,20,50,100",
                        help="comma-separated inner step counts K")
    parser.add_argument("--time", action="store_true",
                        help="also run and time each compiled step")
    args = parser.parse_args()
    steps = [int(k) for k in args.steps.split(",")]
    data = sinusoid.load_data()

    rows = []
    timed: dict | None = {} if args.time else None
    for num_steps in steps:
        for checkpoint in (False, True):
            row = {"K": num_steps, "checkpoint": checkpoint,
                   **step_costs(num_steps, checkpoint, data, timed)}
            rows.append(row)
            print(f"  compiled K={num_steps:>4} checkpoint={checkpoint!s:5} in "
                  f"{row['compile_s']:5.1f} s", flush=True)

    print(f"\nsecond-order MAML step, sinusoid 1-40-40-1, 25 tasks, 10+10 points; {machine()}")
    print(f"{'K':>5} {'split':>10} {'temp MB':>9} {'temp MB ckpt':>12} {'ratio':>6} "
          f"{'MFLOP':>9} {'MFLOP ckpt':>10}")
    plain = {r["K"]: r for r in rows if not r["checkpoint"]}
    ckpt = {r["K"]: r for r in rows if r["checkpoint"]}
    for k in steps:
        print(f"{k:>5} {split(k):>10} {plain[k]['temp_bytes'] / 1e6:9.2f} "
              f"{ckpt[k]['temp_bytes'] / 1e6:12.2f} "
              f"{ckpt[k]['temp_bytes'] / plain[k]['temp_bytes']:6.2f} "
              f"{plain[k]['flops'] / 1e6:9.1f} {ckpt[k]['flops'] / 1e6:10.1f}")

    large = [k for k in steps if k >= 5]
    print("\ntemp memory vs K (expected exponents: plain ≈ 1, checkpointed ≈ 0.5)")
    for name, table in (("plain", plain), ("checkpoint", ckpt)):
        temp = np.array([table[k]["temp_bytes"] for k in large])
        per_step = np.polyfit(large, temp, 1)[0] if len(large) > 1 else float("nan")
        growth = ""
        if 1 in table:
            extra = temp - table[1]["temp_bytes"]
            growth = f"b(temp − temp(K=1)) = {log_log_slope(large, extra):5.2f}, "
        print(f"  {name:10}: b(temp) = {log_log_slope(large, temp):5.2f}, {growth}"
              f"{per_step / 1e3:6.1f} kB per step (linear fit), K={steps[-1]} / K={steps[0]}: "
              f"{table[steps[-1]]['temp_bytes'] / table[steps[0]]['temp_bytes']:.1f}x")
    print(f"  one task batch of φ (25 × 1761 float32): {25 * sinusoid.NUM_PARAMS * 4 / 1e3:.0f} kB")
    if timed:
        seconds = interleaved_best(timed)
        print("\nstep time, ms (plain, checkpointed, ratio)")
        for k in steps:
            plain_ms, ckpt_ms = seconds[k, False] * 1e3, seconds[k, True] * 1e3
            print(f"  K={k:>4}: {plain_ms:8.2f} {ckpt_ms:8.2f} {ckpt_ms / plain_ms:6.2f}")


if __name__ == "__main__":
    main()

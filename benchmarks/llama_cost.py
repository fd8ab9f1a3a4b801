"""Cost of LLAMA's curvature penalty: MetaEB meta-iterations with ``llama`` vs ``maml``.

The DESIGN targets: ``llama`` with ``kfac`` at ≤ 1.3× and with ``ggn`` at ≤ 2× the cost of
``maml`` per meta-iteration (the paper reports 1.8× for K-FAC). Setting as
``maml_sinusoid.py``: the zoo's sinusoid model (1-40-40-1 ReLU net), 25 tasks, 10 + 10
points, 5 inner steps, second order, Adam. Prints meta-iterations per second and the ratios.

    python benchmarks/llama_cost.py [--steps 200] [--first-order]
"""

from __future__ import annotations

import argparse
import time

import jax
import optax

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import sinusoid


def compiled_step(driver: hbm.MetaEB, data):
    """The driver's jitted step and its arguments, compiled."""
    support, query = data.support, data.query
    state = driver.init(jax.random.PRNGKey(2), support, query,
                        sinusoid.init_params(jax.random.PRNGKey(1)))
    step = jax.jit(driver.update)  # the public step
    args = (state, jax.random.PRNGKey(3), support, query)
    jax.block_until_ready(step(*args))
    return step, args


def rate(step, args, steps: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(steps):
        out = step(*args)
    jax.block_until_ready(out)
    return steps / (time.perf_counter() - start), float(out[1].loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing rounds; the best rate of each is kept (a "
                             "shared machine's noise only slows runs down)")
    parser.add_argument("--first-order", action="store_true")
    args = parser.parse_args()
    data = sinusoid.simulate(jax.random.PRNGKey(0), num_tasks=25, shots=10, num_query=10)
    inner = hbm.TruncatedGD(5, sinusoid.FIT["maml_step_size"], first_order=args.first_order)
    steps = {}
    for label, objective, curvature in (("maml", "maml", "full"), ("llama kfac", "llama", "kfac"),
                                        ("llama ggn", "llama", "ggn")):
        driver = hbm.MetaEB(sinusoid.model, inner=inner, objective=objective,
                            curvature=curvature, optimizer=optax.adam(1e-3))
        steps[label] = compiled_step(driver, data)
    rates = dict.fromkeys(steps, 0.0)
    losses = {}
    for _ in range(args.repeats):
        for label, (step, step_args) in steps.items():
            value, losses[label] = rate(step, step_args, args.steps)
            rates[label] = max(rates[label], value)
    print(f"sinusoid, 25 tasks, 10+10 points, 1-40-40-1, 5 inner steps, "
          f"{'first' if args.first_order else 'second'} order, {jax.default_backend()}, "
          f"best of {args.repeats}")
    for label in steps:
        print(f"  {label:11s}: {rates[label]:8.1f} meta-iterations/s  (loss {losses[label]:.4f})")
    for label, target in (("llama kfac", 1.3), ("llama ggn", 2.0)):
        print(f"  cost {label} / maml: {rates['maml'] / rates[label]:.2f}  (target ≤ {target})")


if __name__ == "__main__":
    main()

"""Cost of LLAMA's curvature penalty: MetaEB meta-iterations with ``llama`` vs ``maml``.

The DESIGN targets: ``llama`` with ``kfac`` at ≤ 1.3× and with ``ggn`` at ≤ 2× the cost of
``maml`` per meta-iteration (the paper reports 1.8× for K-FAC). Default setting as
``maml_sinusoid.py``: the zoo's sinusoid model (1-40-40-1 ReLU net), 25 tasks, 10 + 10
points, 5 inner steps, second order, Adam. ``--nway N`` instead times N-way 1-shot episodes
of the few-shot zoo model (196-128-64-N MLP on 14×14 images, 16 episodes, ``--k-query``
query images per class, one inner step, K-FAC only: the GGN's n VJPs over N·k_query outputs
are out of its league there); the images are random pixels, since only shapes set the cost.
Prints meta-iterations per second and the ratios, all timed in one process, in interleaved
rounds (best of ``--repeats``).

    python benchmarks/llama_cost.py [--steps 200] [--first-order]
    python benchmarks/llama_cost.py --nway 20 [--k-query 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import fewshot, sinusoid


def compiled_step(driver: hbm.MetaEB, support, query, init_params):
    """The driver's jitted step and its arguments, compiled."""
    state = driver.init(jax.random.PRNGKey(2), support, query, init_params)
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


def sinusoid_setting(args):
    data = sinusoid.simulate(jax.random.PRNGKey(0), num_tasks=25, shots=10, num_query=10)
    inner = hbm.TruncatedGD(5, sinusoid.FIT["maml_step_size"], first_order=args.first_order)
    title = (f"sinusoid, 25 tasks, 10+10 points, 1-40-40-1, 5 inner steps, "
             f"{'first' if args.first_order else 'second'} order")
    methods = (("maml", "maml", "full"), ("llama kfac", "llama", "kfac"),
               ("llama ggn", "llama", "ggn"))
    return (sinusoid.model, inner, data.support, data.query,
            sinusoid.init_params(jax.random.PRNGKey(1)), title, methods)


def fewshot_setting(args):
    """N-way 1-shot episodes with random 14×14 images (the cost depends on shapes only)."""
    n_way, tasks, k_query = args.nway, 16, args.k_query
    model = fewshot.make_model(n_way)
    rng = np.random.default_rng(0)

    def episodes(per_class):
        x = rng.uniform(size=(tasks, n_way * per_class, model.sizes[0])).astype(np.float32)
        y = np.broadcast_to(np.repeat(np.arange(n_way), per_class), x.shape[:2]).astype(np.int32)
        return {"x": x, "y": y}

    inner = hbm.TruncatedGD(1, 2.0 / n_way, first_order=args.first_order)
    title = (f"fewshot {n_way}-way 1-shot, {k_query} query per class, {tasks} episodes, "
             f"{'-'.join(map(str, model.sizes))} MLP, 1 inner step, "
             f"{'first' if args.first_order else 'second'} order, random images")
    methods = (("maml", "maml", "full"), ("llama kfac", "llama", "kfac"))
    return (model, inner, episodes(1), episodes(k_query),
            fewshot.init_params_for(model, jax.random.PRNGKey(1)), title, methods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="meta-iterations per timing round (default 200; 20 with --nway)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing rounds; the best rate of each is kept (a "
                             "shared machine's noise only slows runs down)")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--nway", type=int, default=None,
                        help="time N-way few-shot episodes instead of the sinusoid")
    parser.add_argument("--k-query", type=int, default=5, help="query images per class")
    args = parser.parse_args()
    setting = fewshot_setting if args.nway else sinusoid_setting
    model, inner, support, query, init_params, title, methods = setting(args)
    num_steps = args.steps or (20 if args.nway else 200)
    steps = {}
    for label, objective, curvature in methods:
        driver = hbm.MetaEB(model, inner=inner, objective=objective, curvature=curvature,
                            optimizer=optax.adam(1e-3))
        steps[label] = compiled_step(driver, support, query, init_params)
    rates = dict.fromkeys(steps, 0.0)
    losses = {}
    for _ in range(args.repeats):
        for label, (step, step_args) in steps.items():
            value, losses[label] = rate(step, step_args, num_steps)
            rates[label] = max(rates[label], value)
    print(f"{title}, {jax.default_backend()}, best of {args.repeats}")
    for label in steps:
        print(f"  {label:11s}: {rates[label]:8.1f} meta-iterations/s  (loss {losses[label]:.4f})")
    targets = {"llama kfac": 1.6 if args.nway and args.nway >= 20 else 1.3, "llama ggn": 2.0}
    for label in steps:
        if label in targets:
            print(f"  cost {label} / maml: {rates['maml'] / rates[label]:.2f}  "
                  f"(target ≤ {targets[label]})")


if __name__ == "__main__":
    main()

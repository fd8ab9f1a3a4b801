"""MAML on sinusoid regression: the library's MetaEB step against hand-written JAX MAML.

Issue 12's target: MAML through ``MetaEB`` (objective ``"maml"``) at ≥ 0.95× the speed of the
fastest hand-written JAX MAML of the same net (1-40-40-1 ReLU, 25 tasks, 10 + 10 points, K = 5
inner steps, second order, float32), same data, same optimiser (Adam 1e-3). Two model layouts:

* ``flat``: one task site ``phi`` holding all 1761 weights of a task as one vector, the net
  slicing it; the hand-written baseline is the same flat net.
* ``arrays``: one task site per weight array (``w0, b0, w1, b1, w2, b2`` under
  ``hbm.tasks``, each Normal(θ_array, 1) with the θ arrays global); the hand-written baseline
  keeps the six arrays as a pytree.

Each hand-written baseline is ``jax.vmap`` over tasks of a K-step inner loop, written both as
an unrolled Python loop and as a ``lax.scan``; ``jax.value_and_grad`` of the query loss, optax
Adam, one jitted step. All steps are compiled first, then timed in interleaved rounds in this
process (each round: a median over ≥ ``--seconds`` of calls per step), the best round of each
kept. The ratio is MetaEB against the faster hand-written loop of its layout. The script
checks that every step computes the same loss (to 1e-4 relative).

    python benchmarks/maml_sinusoid.py [--layout flat|arrays|both] [--rounds 20]
        [--seconds 0.3] [--first-order] [--dump-hlo DIR]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from _bench import interleaved_best, machine

import numpyro_hbmeta as hbm

SIZES = (1, 40, 40, 1)
SHAPES = list(itertools.pairwise(SIZES))
NUM_PARAMS = sum(a * b + b for a, b in SHAPES)
NOISE = 0.1  # N(f(x), 0.1²) likelihood: MSE / (2·0.01) up to a constant
ARRAYS = tuple(f"{kind}{i}" for i in range(len(SHAPES)) for kind in ("w", "b"))
K = 5
# MAML's inner rate 0.01 on the mean squared error is 0.01·2σ²/n = 2e-5 on the NLL.
STEP_SIZE = 2e-5


# -- the net, in both layouts -------------------------------------------------------------
def unpack(flat):
    """Flat weights (..., NUM_PARAMS) -> [(w, b), ...]. One ``jnp.split`` (its transpose is a
    ``concatenate``) rather than a slice per array (each slice's transpose pads to the full
    width, and the gradient sums six padded arrays): same values, faster gradients."""
    sizes = [n for a, b in SHAPES for n in (a * b, b)]
    offsets = list(itertools.accumulate(sizes))[:-1]
    parts = jnp.split(flat, offsets, axis=-1)
    lead = flat.shape[:-1]
    return [(parts[2 * i].reshape((*lead, a, b)), parts[2 * i + 1])
            for i, (a, b) in enumerate(SHAPES)]


def mlp(pairs, x):
    h = x
    for i, (w, b) in enumerate(pairs):
        h = h @ w + b
        if i < len(pairs) - 1:
            h = jax.nn.relu(h)
    return h[..., 0]


def net(flat, x):
    """x: (points, 1) for one task's flat weights (NUM_PARAMS,)."""
    return mlp(unpack(flat), x)


def net_arrays(params, x):
    """x: (points, 1) for one task's weights {w0: (1, 40), b0: (40,), ...}."""
    return mlp([(params[f"w{i}"], params[f"b{i}"]) for i in range(len(SHAPES))], x)


def array_shapes():
    shapes = {}
    for i, (a, b) in enumerate(SHAPES):
        shapes[f"w{i}"], shapes[f"b{i}"] = (a, b), (b,)
    return shapes


# -- the two models -----------------------------------------------------------------------
def model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([NUM_PARAMS]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))  # (tasks, 1, P)
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jax.vmap(net)(phi[:, 0], x), NOISE), obs=y)


def model_arrays(x, y=None):
    """One task site per weight array; θ_array global."""
    thetas = {name: numpyro.sample(f"theta_{name}", dist.Normal(0.0, 1.0).expand(shape)
                                   .to_event(len(shape)))
              for name, shape in array_shapes().items()}
    with hbm.tasks(x.shape[0], dim=-2):
        phis = {name: numpyro.sample(name, dist.Normal(theta, 1.0).to_event(theta.ndim))[:, 0]
                for name, theta in thetas.items()}  # (tasks, 1, *shape) -> (tasks, *shape)
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jax.vmap(net_arrays)(phis, x), NOISE), obs=y)


def sinusoid_tasks(key, num_tasks=25, num_points=20):
    k1, k2, k3 = jax.random.split(key, 3)
    amplitude = jax.random.uniform(k1, (num_tasks, 1), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(k2, (num_tasks, 1), minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(k3, (num_tasks, num_points, 1), minval=-5.0, maxval=5.0)
    y = amplitude * jnp.sin(x[..., 0] - phase)
    return {"x": x[:, :10], "y": y[:, :10]}, {"x": x[:, 10:], "y": y[:, 10:]}


def init_arrays(key):
    out = {}
    for i, ((a, b), k) in enumerate(zip(SHAPES, jax.random.split(key, len(SHAPES)),
                                        strict=True)):
        out[f"w{i}"] = jax.random.uniform(k, (a, b), minval=-1.0, maxval=1.0) / jnp.sqrt(a)
        out[f"b{i}"] = jnp.zeros(b)
    return out


def init_theta(key):
    arrays = init_arrays(key)
    return jnp.concatenate([arrays[name].ravel() for name in ARRAYS])


# -- hand-written MAML --------------------------------------------------------------------
HALF_LOG_2PI_SIGMA = 0.5 * math.log(2 * math.pi) + math.log(NOISE)


def hand_written(net_fn, theta, support, query, optimizer, *, unroll, first_order):
    """One jitted meta-step for ``net_fn(params, x)``, params any pytree (flat or arrays)."""

    def nll(phi, x, y):  # −Σ log N(y | f(x), σ²), written out
        z = (y - net_fn(phi, x)) / NOISE
        return jnp.sum(0.5 * z * z + HALF_LOG_2PI_SIGMA)

    def task_loss(theta, xs, ys, xq, yq):
        def inner_step(phi):
            g = jax.grad(nll)(phi, xs, ys)
            if first_order:
                g = jax.lax.stop_gradient(g)
            return jax.tree.map(lambda p, gp: p - STEP_SIZE * gp, phi, g)

        phi = theta
        if unroll:
            for _ in range(K):
                phi = inner_step(phi)
        else:
            phi, _ = jax.lax.scan(lambda p, _: (inner_step(p), None), phi, None, length=K)
        return nll(phi, xq, yq)

    def loss(theta):
        return jnp.sum(jax.vmap(task_loss, (None, 0, 0, 0, 0))(
            theta, support["x"], support["y"], query["x"], query["y"]))

    @jax.jit
    def step(theta, state):
        value, grad = jax.value_and_grad(loss)(theta)
        updates, state = optimizer.update(grad, state, theta)
        return optax.apply_updates(theta, updates), state, value

    return step, (theta, optimizer.init(theta))


def library(model_fn, init_params, support, query, optimizer, *, first_order):
    inner = hbm.TruncatedGD(K, STEP_SIZE, first_order=first_order)
    driver = hbm.MetaEB(model_fn, inner=inner, objective="maml", optimizer=optimizer)
    state = driver.init(jax.random.PRNGKey(2), support, query, init_params)
    step = jax.jit(driver.update)  # the public step; jit folds its shape lookup into the trace
    return step, (state, jax.random.PRNGKey(3), support, query)


def dump_hlo(directory, name, step, args):
    compiled = step.lower(*args).compile()
    os.makedirs(directory, exist_ok=True)
    text = compiled.as_text()
    with open(os.path.join(directory, f"{name}.txt"), "w") as f:
        f.write(text)
    counts = {op: text.count(f" {op}(") for op in ("fusion", "while", "concatenate", "copy",
                                                   "transpose", "dot", "convolution", "slice",
                                                   "dynamic-slice", "dynamic-update-slice")}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    print(f"  HLO {name:22s} flops {cost.get('flops', float('nan')):.3g} "
          + " ".join(f"{k}={v}" for k, v in counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("flat", "arrays", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=0.3,
                        help="least time per step per round")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--dump-hlo", metavar="DIR", help="write each step's optimized HLO")
    args = parser.parse_args()
    support, query = sinusoid_tasks(jax.random.PRNGKey(0))
    optimizer = optax.adam(1e-3)
    layouts = ("flat", "arrays") if args.layout == "both" else (args.layout,)
    first_order = args.first_order

    steps = {}
    for layout in layouts:
        if layout == "flat":
            theta = init_theta(jax.random.PRNGKey(1))
            net_fn, model_fn, init_params = net, model, {"theta": theta}
        else:
            theta = init_arrays(jax.random.PRNGKey(1))
            net_fn, model_fn = net_arrays, model_arrays
            init_params = {f"theta_{name}": value for name, value in theta.items()}
        for unroll in (True, False):
            name = f"{layout}: hand-written {'unrolled' if unroll else 'scan'}"
            steps[name] = hand_written(net_fn, theta, support, query, optimizer,
                                       unroll=unroll, first_order=first_order)
        steps[f"{layout}: MetaEB"] = library(model_fn, init_params, support, query,
                                             optimizer, first_order=first_order)

    losses = {}
    for name, (step, step_args) in steps.items():  # compile and read the loss
        out = jax.block_until_ready(step(*step_args))
        losses[name] = float(out[1].loss if name.endswith("MetaEB") else out[2])
        if args.dump_hlo:
            dump_hlo(args.dump_hlo, name.replace(": ", "_").replace(" ", "_"), step, step_args)

    def call(step, step_args):
        return lambda: step(*step_args)

    seconds = interleaved_best({name: call(*entry) for name, entry in steps.items()},
                               rounds=args.rounds, min_calls=20, min_seconds=args.seconds)

    print(f"sinusoid MAML, 25 tasks, 10+10 points, 1-40-40-1, {K} inner steps, "
          f"{'first' if first_order else 'second'} order, float32, best of {args.rounds} "
          "interleaved rounds")
    print(f"  {machine()}")
    print(f"  {'step':34s} {'meta-it/s':>10s}  loss")
    for name in steps:
        print(f"  {name:34s} {1 / seconds[name]:10.1f}  {losses[name]:.4f}")
    bad = False
    for layout in layouts:
        hand = {n: s for n, s in seconds.items() if n.startswith(layout) and "hand" in n}
        fastest = min(hand, key=hand.get)
        ratio = hand[fastest] / seconds[f"{layout}: MetaEB"]
        print(f"  {layout}: MetaEB / fastest hand-written ({fastest.split('written ')[1]}): "
              f"{ratio:.2f}  (target >= 0.95)")
        ref = losses[fastest]
        for name, value in losses.items():
            if name.startswith(layout) and not math.isclose(value, ref, rel_tol=1e-4):
                print(f"  {name} disagrees on the loss: {value} vs {ref}")
                bad = True
    if bad:
        raise SystemExit("the implementations disagree on the loss")


if __name__ == "__main__":
    main()

"""One Adam step of Laplace-EB against a hand-written closed-form evidence step (issue 12.4).

The zoo's linear model, ``linear.simulate(key, num_tasks=J, num_support=10)`` (d = 2), float32:

* ``laplace``: ``MetaEB(linear.model, inner=Newton(), objective="laplace",
  optimizer=optax.adam(1e-2)).update(state, key, support)``, the library's compiled step;
* ``closed``: a jitted Adam step on −Σ_j log N(y_j | X_j θ, σ² I + τ² X_j X_jᵀ) written by hand
  with the Woodbury identity and the matrix determinant lemma on the 2×2 blocks
  M_j = I/τ² + X_jᵀX_j/σ² (adjugate inverse, no LAPACK), from the raw data every step, the
  globals unconstrained as MetaEB's (θ, log τ, log σ).

Both run from the same start; they descend the same function (the Laplace evidence is exact
here), which the script checks at the start. Times are the best of interleaved rounds
(``_bench.interleaved_best``) in one process; FLOPs and bytes from XLA's cost analysis (a
``while_loop`` body counted once). Target: laplace / closed ≤ 2 at J = 1000.

    python benchmarks/laplace_step.py [--tasks 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bench import compiled_costs, interleaved_best, machine

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


def closed_form_loss(params, x, y):
    """−Σ_j log N(y_j | X_j θ, σ² I + τ² X_j X_jᵀ) by Woodbury on the 2×2 blocks."""
    theta, tau, sigma = params["theta"], jnp.exp(params["tau"]), jnp.exp(params["sigma"])
    n = x.shape[1]
    r = y - x @ theta                                          # (J, n)
    xtx = jnp.einsum("jnf,jng->jfg", x, x)                     # (J, 2, 2)
    xtr = jnp.einsum("jnf,jn->jf", x, r)                       # (J, 2)
    s2, t2 = sigma**2, tau**2
    a = 1 / t2 + xtx[:, 0, 0] / s2                             # M = I/τ² + XᵀX/σ²
    b = xtx[:, 0, 1] / s2
    c = 1 / t2 + xtx[:, 1, 1] / s2
    det = a * c - b * b
    u, v = xtr[:, 0], xtr[:, 1]
    quad_m = (c * u * u - 2 * b * u * v + a * v * v) / det    # (Xᵀr)ᵀ M⁻¹ (Xᵀr)
    quad = jnp.sum(r * r, -1) / s2 - quad_m / s2**2
    logdet = n * jnp.log(s2) + 2 * jnp.log(t2) + jnp.log(det)
    return 0.5 * jnp.sum(quad + logdet + n * np.log(2 * np.pi))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=args.tasks, num_support=10)
    support = data.support
    optimizer = optax.adam(1e-2)
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optimizer)
    init = {"theta": jnp.array([0.5, 0.0]), "tau": jnp.asarray(1.0),
            "sigma": jnp.asarray(1.0)}
    state = driver.init(jax.random.PRNGKey(1), support, init_params=init)
    key = jax.random.PRNGKey(2)

    x, y = support["x"], support["y"]

    @jax.jit
    def closed_step(params, opt_state):
        value, grads = jax.value_and_grad(closed_form_loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params0 = state.params
    opt0 = optimizer.init(params0)

    # The same objective: the library's loss against the closed form at the start.
    lib = float(driver.loss(params0, support))
    ref = float(closed_form_loss(params0, x, y))
    print(machine())
    print(f"J={args.tasks}, d=2, 10 points/task, float32; loss at start: laplace {lib:.4f}, "
          f"closed form {ref:.4f} (rel. diff {abs(lib - ref) / abs(ref):.1e})")

    config = driver._config(support, None, None)
    compile_s = {}
    start = time.perf_counter()
    lowered = driver._update_jit.lower(state, key, support, None, config=config)
    compiled_laplace = lowered.compile()
    compile_s["laplace"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled_closed = closed_step.lower(params0, opt0).compile()
    compile_s["closed"] = time.perf_counter() - start

    fns = {"laplace": lambda: compiled_laplace(state, key, support, None),
           "closed": lambda: compiled_closed(params0, opt0)}
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = interleaved_best(fns, rounds=args.rounds)
    costs = {"laplace": compiled_costs(compiled_laplace),
             "closed": compiled_costs(compiled_closed)}
    text = compiled_laplace.as_text()
    print(f"{'step':>8} {'ms':>8} {'MFLOP':>8} {'MB accessed':>11} {'compile s':>9}")
    for name in fns:
        print(f"{name:>8} {best[name] * 1e3:8.3f} {costs[name]['flops'] / 1e6:8.2f} "
              f"{costs[name]['bytes_accessed'] / 1e6:11.2f} {compile_s[name]:9.2f}")
    print(f"laplace / closed: {best['laplace'] / best['closed']:.2f}x (target ≤ 2x)")
    print(f"laplace step HLO: {text.count('custom_call_target')} custom calls, "
          f"{text.count(' while(')} while loops")
    print(machine())


if __name__ == "__main__":
    main()

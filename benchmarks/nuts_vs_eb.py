"""Laplace empirical Bayes against NUTS, and NUTS on the Laplace marginal against full NUTS.

Part 1, the zoo's linear model (``linear.simulate(key, num_tasks=J, num_support=10)``, J =
100 and 1000 by default): wall time to the globals by

* Laplace-EB: ``MetaEB(linear.model, inner=Newton(), objective="laplace",
  optimizer=optax.lbfgs()).run(key, --eb-steps, support)``, timed twice on the same driver:
  the first call compiles and fits, the second (nothing recompiled) only fits;
* NUTS on the full model (θ, τ, σ and every φ_j): ``hbm.baselines.run_nuts`` with
  ``--warmup``/``--samples``/2 chains.

Compile is the time JAX reports through ``jax.monitoring`` for tracing, lowering and XLA
compilation during the call; fit = wall time − compile.

It prints τ̂ (EB), NUTS's posterior mean and sd of τ, the exact type-II ML τ (SciPy on the
closed-form evidence), and the end-to-end and fit-only ratios NUTS / EB. Issue 12's target:
Laplace-EB ≥ 10× faster than NUTS end to end at J = 1000.

Part 2, the zoo's logistic model (its default data, support and query joined, or ``--small``):
``hbm.baselines.run_nuts_marginal`` (NUTS over θ, τ with the tasks marginalised by Laplace)
against ``run_nuts`` in minimum bulk ESS (ArviZ ``az.ess`` over the globals' components) per
second of sampling after compile (compile measured as above). Target: the marginal at least
as efficient as full NUTS.

    python benchmarks/nuts_vs_eb.py [--tasks 100,1000] [--warmup 500] [--samples 1000]
                                    [--eb-steps 100] [--small] [--skip-linear] [--skip-logistic]
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import jax
import numpy as np
import optax
from _bench import CompileClock, machine

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear, logistic

CLOCK = CompileClock().install()


def eb_fit(support, num_steps: int) -> dict[str, float]:
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.lbfgs())
    seconds, compile_s = [], []
    for _ in range(2):  # first: compile + fit; second: the same fit, nothing recompiled
        CLOCK.reset()
        start = time.perf_counter()
        fit = driver.run(jax.random.PRNGKey(1), num_steps, support, progress_bar=False)
        jax.block_until_ready(fit.params)
        seconds.append(time.perf_counter() - start)
        compile_s.append(CLOCK.seconds)
    return {"total_s": seconds[0], "compile_s": compile_s[0],
            "fit_s": seconds[0] - compile_s[0], "second_s": seconds[1],
            "second_compile_s": compile_s[1], "tau": float(fit.params["tau"]),
            "converged": fit.converged}


def nuts_times(run, model, data, *, warmup: int, samples: int) -> tuple[hbm.FitResult, dict]:
    """One run of ``run`` (run_nuts or run_nuts_marginal), its compile time from JAX."""
    CLOCK.reset()
    full = run(model, data, jax.random.PRNGKey(2), num_warmup=warmup, num_samples=samples,
               progress_bar=False)
    return full, {"total_s": full.wall_time, "compile_s": CLOCK.seconds,
                  "fit_s": full.wall_time - CLOCK.seconds}


def linear_part(args) -> None:
    rows = []
    for num_tasks in args.tasks:
        data = linear.simulate(jax.random.PRNGKey(0), num_tasks=num_tasks, num_support=10)
        eb = eb_fit(data.support, args.eb_steps)
        nuts, times = nuts_times(hbm.baselines.run_nuts, linear.model, data.support,
                                 warmup=args.warmup, samples=args.samples)
        exact = float(linear.exact_type2_ml(data.support)["tau"])
        tau = nuts.samples["tau"]
        rows.append((num_tasks, eb, times, float(tau.mean()), float(tau.std()), exact,
                     nuts.info["divergences"]))
        print(f"  J={num_tasks} done", flush=True)

    print(f"\nLaplace-EB (Newton, L-BFGS, {args.eb_steps} steps) vs NUTS ({args.warmup} warmup "
          f"+ {args.samples} draws × 2 chains), linear model, 10 points per task; {machine()}")
    print(f"{'J':>6} {'method':>6} {'compile s':>9} {'fit s':>8} {'total s':>8}   τ")
    for num_tasks, eb, nuts, mean, sd, exact, divergences in rows:
        print(f"{num_tasks:>6} {'EB':>6} {eb['compile_s']:9.2f} {eb['fit_s']:8.2f} "
              f"{eb['total_s']:8.2f}   τ̂ = {eb['tau']:.4f} (exact type-II ML {exact:.4f}; "
              f"converged: {eb['converged']}; second run {eb['second_s']:.2f} s, of it "
              f"{eb['second_compile_s']:.2f} s compiling)")
        print(f"{num_tasks:>6} {'NUTS':>6} {nuts['compile_s']:9.2f} {nuts['fit_s']:8.2f} "
              f"{nuts['total_s']:8.2f}   E[τ] = {mean:.4f} ± {sd:.4f} "
              f"({divergences} divergences)")
        fit_ratio = f"{nuts['fit_s'] / eb['fit_s']:.1f}x"
        print(f"{'':>6} {'ratio':>6} NUTS / EB: end to end {nuts['total_s'] / eb['total_s']:.1f}x,"
              f" fit only {fit_ratio} (target ≥ 10x end to end at "
              f"J=1000); |τ̂ − E[τ]| = {abs(eb['tau'] - mean) / sd:.2f} posterior sd")


def min_bulk_ess(result: hbm.FitResult, names) -> float:
    """Smallest bulk ESS over every component of the named sites (draws (chain, draw, ...))."""
    ess = az.ess({name: np.asarray(result.samples[name]) for name in names}, method="bulk")
    return min(float(np.min(ess[name].values)) for name in names)


def logistic_part(args) -> None:
    data = logistic.load_data(small=args.small).all_data()
    rows = []
    for name, run in (("nuts", hbm.baselines.run_nuts),
                      ("nuts_marginal", hbm.baselines.run_nuts_marginal)):
        result, times = nuts_times(run, logistic.model, data, warmup=args.warmup,
                                   samples=args.samples)
        ess = min_bulk_ess(result, logistic.GLOBALS)
        rows.append((name, times, ess, result.info["divergences"],
                     {k: float(np.mean(result.samples[k])) for k in ("tau",)}))
        print(f"  {name} done", flush=True)
    shape = data["x"].shape
    print(f"\nlogistic model, {shape[0]} tasks × {shape[1]} points, globals θ (3) and τ; "
          f"{args.warmup} warmup + {args.samples} draws × 2 chains; {machine()}")
    print(f"{'method':>14} {'compile s':>9} {'fit s':>8} {'min bulk ESS':>12} {'ESS/s':>8} "
          f"{'E[τ]':>7} {'div':>4}")
    for name, times, ess, divergences, means in rows:
        print(f"{name:>14} {times['compile_s']:9.2f} {times['fit_s']:8.2f} {ess:12.0f} "
              f"{ess / times['fit_s']:8.1f} {means['tau']:7.3f} {divergences:4d}")
    (_, full, ess_full, *_), (_, marginal, ess_marginal, *_) = rows
    ratio = (ess_marginal / marginal["fit_s"]) / (ess_full / full["fit_s"])
    print(f"min-ESS/s ratio marginal / full: {ratio:.2f} (target ≥ 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="100,1000",
                        type=lambda s: [int(j) for j in s.split(",")])
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--eb-steps", type=int, default=100)
    parser.add_argument("--small", action="store_true", help="logistic: its small data")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--skip-logistic", action="store_true")
    args = parser.parse_args()
    if not args.skip_linear:
        linear_part(args)
    if not args.skip_logistic:
        logistic_part(args)


if __name__ == "__main__":
    main()

"""Time to the first Laplace-EB step on the statistical zoo models, and what compiles (issue 12.5).

For each model a fresh process-level driver ``MetaEB(model, inner=Newton(), objective="laplace")``
runs ``run(key, 1, ...)`` on the model's default data, and again on the same driver. Compilation
is counted and timed with ``jax.monitoring`` (JAX's own duration events: tracing to a jaxpr,
lowering to MLIR, and the backend compile), not with a stopwatch around the call; the wall time
of each call is printed next to it, so what is left (the eager model check, Python, the step
itself) is the difference.

    python benchmarks/first_step.py [--models linear logistic eight_schools radon]
                                    [--final-checks] [--cache DIR]

``--final-checks`` includes the end-of-run checks (outer convergence, the boundary check of
the scales and, for MAML, the implicit-prior check), which compile a full-data loss of their
own. ``--cache DIR`` turns on JAX's persistent compilation cache, so a second invocation shows
the warm-cache figure.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import optax
from _bench import CompileClock, machine


def _one_step(driver, support, final_checks: bool):
    return driver.run(jax.random.PRNGKey(1), 1, support, progress_bar=False,
                      final_checks=final_checks).params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["linear", "logistic", "eight_schools", "radon"])
    parser.add_argument("--final-checks", action="store_true")
    parser.add_argument("--cache", default=None, help="persistent compilation cache dir")
    args = parser.parse_args()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    import numpyro_hbmeta as hbm
    from numpyro_hbmeta.models import get_zoo_model

    clock = CompileClock().install()
    print(machine())
    print(f"Laplace-EB (Newton), run(key, 1), final_checks={args.final_checks}\n")
    header = (f"{'model':14s} {'call':6s} {'wall s':>7s} {'compiles':>8s} {'trace s':>8s} "
              f"{'lower s':>8s} {'compile s':>9s} {'other s':>8s}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        zoo = get_zoo_model(name)
        support = zoo.load_data(jax.random.PRNGKey(0)).all_data()
        driver = hbm.MetaEB(zoo.model, inner=hbm.Newton(), objective="laplace",
                            optimizer=optax.adam(zoo.fit.eb_learning_rate))
        for call in ("first", "second"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one step has not converged: expected
                clock.reset()
                start = time.perf_counter()
                jax.block_until_ready(_one_step(driver, support, args.final_checks))
                wall = time.perf_counter() - start
            phases = clock.phases
            print(f"{name:14s} {call:6s} {wall:7.2f} {clock.count:8d} {phases['trace']:8.2f} "
                  f"{phases['lower']:8.2f} {phases['compile']:9.2f} {wall - clock.seconds:8.2f}")
    print("\nwall: the call's wall time; compiles: backend compilations (jax.monitoring); "
          "trace/lower/compile: JAX's own durations of those phases; other: wall minus them "
          "(the eager model check, Python, the step).")


if __name__ == "__main__":
    main()

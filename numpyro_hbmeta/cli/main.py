"""The ``hbmeta`` command line.

``hbmeta models`` lists the zoo; ``hbmeta compare MODEL`` fits one zoo model with each
method, prints the table of global estimates and writes ``DIR/report.md``.

Every argument is checked before anything is fitted; a user error prints one line and exits
with status 2, never a traceback. Off a terminal (a pipe, a CI log) progress bars are off and
each method prints a start and a finish line instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error in the arguments: printed as one line, exit status 2."""


def _epilog() -> str:
    from numpyro_hbmeta import models
    from numpyro_hbmeta.infer.methods import DESCRIPTIONS

    lines = ["models (hbmeta compare MODEL; default methods in brackets):"]
    for name in models.ZOO:
        zoo = models.get_zoo_model(name)
        lines.append(f"  {name:14s} {zoo.summary} [{','.join(zoo.default_methods)}]")
    lines += ["", "methods (--methods a,b,...):"]
    lines += [f"  {name:14s} {text}" for name, text in DESCRIPTIONS.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    epilog = _epilog()
    parser = argparse.ArgumentParser(prog="hbmeta", description=__doc__.splitlines()[0],
                                     epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo")
    compare = sub.add_parser("compare", help="fit a zoo model with several methods",
                             epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("model", help="zoo model name (see below or `hbmeta models`)")
    compare.add_argument("--methods", default=None,
                         help="comma-separated methods (default: the model's own, see below)")
    compare.add_argument("--out", default="hbmeta_out", help="output folder")
    compare.add_argument("--seed", type=int, default=0, help="random seed, 0 .. 2**32 - 1")
    compare.add_argument("--small", action="store_true", help="a seconds-sized run")
    compare.add_argument("--no-progress", action="store_true", help="hide progress output")
    compare.add_argument("--x64", action="store_true", help="compute in float64")
    compare.add_argument("--compile-cache", default=None, metavar="DIR",
                         help="keep JAX's persistent compilation cache in DIR, so a second run "
                              "of the same model loads its compiled programs instead of "
                              "compiling them (default: off, or $JAX_COMPILATION_CACHE_DIR)")
    return parser


def _use_compile_cache(folder: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``folder`` (see ``--compile-cache``).

    Most of a first ``hbmeta compare`` is XLA compiling the fits' steps; with the cache a
    repeated run loads them (docs/performance.md, "Compile time"). Off by default, as in JAX:
    jaxlib 0.10 logs a spurious "Target machine feature ... not supported" error for every
    program it loads on some x86 CPUs, and a cache shared by machines with different CPUs can
    load code the host cannot run. Returns the folder in use, or ``None`` when it is off or
    cannot be created (then JAX compiles as usual: the cache only ever saves time).
    """
    import jax

    if folder is None:  # JAX reads $JAX_COMPILATION_CACHE_DIR itself
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    if not folder:
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"hbmeta: note: no compilation cache ({path}: {error.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hbmeta``; returns the exit status (2 for a user error, after one line on
    stderr)."""
    # OpenBLAS threads started inside XLA's own thread pool make every batched eigh/Cholesky
    # of the curvature 10-100x slower on CPU (docs/performance.md); one BLAS thread per
    # LAPACK call is faster here. Set before NumPy/SciPy load OpenBLAS; a user's value wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Must precede the first JAX computation: lets NUTS run chains in parallel on CPU cores.
    import numpyro

    numpyro.set_host_device_count(min(4, os.cpu_count() or 1))
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage message (or --help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    from numpyro_hbmeta import models

    if args.command == "models":
        for name, summary in models.available().items():
            print(f"{name:16s} {summary}")
        return 0
    try:
        zoo, methods, out = _validate(args)
    except UsageError as error:
        print(f"hbmeta: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.x64:
        numpyro.enable_x64()
    _use_compile_cache(args.compile_cache)
    return _compare(args, zoo, methods, out)


def _validate(args: argparse.Namespace):
    """(zoo model, methods, output folder), or :class:`UsageError` naming what is wrong."""
    from numpyro_hbmeta import models
    from numpyro_hbmeta.infer.methods import METHODS

    if args.model not in models.ZOO:
        raise UsageError(f"unknown model {args.model!r}; the zoo has: {', '.join(models.ZOO)} "
                         "(see `hbmeta compare --help`)")
    zoo = models.get_zoo_model(args.model)
    supported = [m for m in METHODS if zoo.supports(m)]
    listing = f"supported methods for {zoo.name}: {', '.join(supported)}"
    if args.methods is None:
        methods = list(zoo.default_methods)
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise UsageError(f"--methods {args.methods!r} names no method; {listing}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; {listing}")
    refused = [m for m in methods if not zoo.supports(m)]
    if refused:
        raise UsageError(f"{zoo.name} does not support {', '.join(refused)} (see the model's "
                         f"docstring); {listing}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise UsageError(f"--methods names {', '.join(repeated)} more than once; {listing}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")
    return zoo, methods, _writable(Path(args.out))


def _writable(out: Path) -> Path:
    """Create ``out`` and check a file can be written there, before any fit."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"--out {str(out)!r} is not a writable folder ({reason})") from None
    return out


def _compare(args: argparse.Namespace, zoo, methods: list[str], out: Path) -> int:
    import jax

    from numpyro_hbmeta.infer.methods import QUERY_METHODS, run_method
    from numpyro_hbmeta.infer.progress import is_terminal
    from numpyro_hbmeta.output.report import global_table, markdown_table

    start = time.perf_counter()
    key_data, key_fit = jax.random.split(jax.random.PRNGKey(args.seed))
    data = zoo.load_data(key_data, small=args.small)
    if data.query is None and any(m in QUERY_METHODS for m in methods):
        skipped = [m for m in methods if m in QUERY_METHODS]
        print(f"hbmeta: {zoo.name} has no query set; skipping {', '.join(skipped)} "
              "(they score held-out query data)", file=sys.stderr)
        methods = [m for m in methods if m not in skipped]
        if not methods:
            print(f"hbmeta: nothing left to run for {zoo.name}; choose among "
                  f"{', '.join(m for m in zoo.default_methods)} (its defaults)", file=sys.stderr)
            return 2
    bars = not args.no_progress and is_terminal()
    lines = not args.no_progress and not bars  # plain start/finish lines off a terminal
    results = []
    for name, key in zip(methods, jax.random.split(key_fit, len(methods)), strict=True):
        print(f"== {name}", flush=True)
        if lines:
            print(f"hbmeta: {name} started", file=sys.stderr, flush=True)
        began = time.perf_counter()
        results.append(run_method(name, zoo, data, key, small=args.small, progress_bar=bars))
        if lines:
            print(f"hbmeta: {name} done in {time.perf_counter() - began:.1f} s",
                  file=sys.stderr, flush=True)
    caption, extra = None, []
    if zoo.compare_report is not None:  # a model whose globals table says nothing
        caption, table, extra = zoo.compare_report(results, data, out, small=args.small)
    else:
        exact = None if zoo.exact_type2_ml is None else zoo.exact_type2_ml(data.all_data())
        header, rows = global_table(results, zoo.globals, truth=data.truth, exact=exact)
        table = markdown_table(header, rows)
    print(table)
    sections = _outputs(results, zoo, data, out) + extra
    total = time.perf_counter() - start
    (out / "report.md").write_text(_report(args, zoo, data, results, table, total, sections,
                                           caption))
    print(f"\nwrote {out / 'report.md'} ({total:.1f} s in all)")
    return 0


def _outputs(results, zoo, data, out) -> list[str]:
    """Write one netCDF per method, the figures and the comparison against NUTS; return the
    report's extra markdown lines (printing the comparison table too)."""
    import arviz as az

    from numpyro_hbmeta.output import plots
    from numpyro_hbmeta.output.compare import compare, not_estimated_lines, summary_table
    from numpyro_hbmeta.output.inference_data import to_inference_data

    lines = []
    # Results without task draws (task_draws=False, or no task posterior at the estimate)
    # have nothing per task to export.
    exported = [r for r in results if set(zoo.task_sites) <= set(r.samples)]
    for result in exported:
        idata = to_inference_data(result, task_labels=data.task_labels)
        idata.to_netcdf(out / f"{result.method}.nc")
        if "diverging" in result.sample_stats:
            summary = az.summary(idata, var_names=list(zoo.globals), kind="diagnostics")
            lines += ["", f"NUTS diagnostics ({result.method}): "
                      f"{result.info.get('divergences', 0)} divergences; R-hat and bulk ESS:",
                      "", summary[["r_hat", "ess_bulk"]].to_markdown()
                      if _has_tabulate() else "```\n" + summary.to_string() + "\n```"]
    if exported:
        lines += ["", "InferenceData (netCDF): " + ", ".join(f"`{r.method}.nc`"
                                                          for r in exported)]
    for site in zoo.task_sites[:1]:
        drawn = [r for r in results if site in r.samples]
        if not drawn:
            continue
        figure = plots.forest(drawn, site, task_labels=data.task_labels)
        path = plots.save(figure, out / f"forest_{site}.png")
        lines += ["", f"Task effects `{site}` by method (50% and 90% intervals):", "",
                  f"![forest]({path.name})"]
    lines += _implicit_prior_figure(results, zoo, data, out)
    if any(r.method == "nuts" for r in results) and len(results) > 1:
        frame = compare(results, reference="nuts")
        text = summary_table(frame).to_string()
        notes = not_estimated_lines(frame)
        if notes:
            text += "\nNaN: not estimated, so not scored:\n" + "\n".join(
                f"  {line}" for line in notes)
        print("\nAgainst NUTS (|Δmean| in NUTS sd, sd ratio, 90% coverage of NUTS draws):")
        print(text)
        lines += ["", "Against NUTS on the full model, site by site (task sites averaged "
                  "over tasks):", "", "```", text, "```"]
    return lines


def _implicit_prior_figure(results, zoo, data, out) -> list[str]:
    """For MAML on a model with 2-D tasks: the implicit prior of K steps of size β at the
    fitted globals against the MAML task posterior (Grant et al. 2018, Fig. 2)."""
    import numpy as np

    from numpyro_hbmeta.infer.eb import MetaEB
    from numpyro_hbmeta.infer.implicit_prior import implicit_prior
    from numpyro_hbmeta.inner import TruncatedGD
    from numpyro_hbmeta.output import plots

    maml = next((r for r in results if r.method == "maml"), None)
    if maml is None or not set(zoo.task_sites) <= set(maml.samples):  # no task draws
        return []
    # Inactive globals are NaN in the draws; the implicit prior does not depend on them, but
    # the model needs a finite value to trace: any point of their support will do.
    params = {k: np.nan_to_num(np.asarray(v)[0, 0], nan=1.0) for k, v in maml.samples.items()
              if k in maml.point_sites}
    inner = TruncatedGD(maml.info["inner_num_steps"], maml.info["inner_step_size"])
    prior = implicit_prior(zoo.model, params, data.support, inner)
    if prior.event_shape != (2,):
        return []
    posterior = MetaEB(zoo.model, inner=inner, objective="maml").task_posterior(params,
                                                                                data.support)
    figure = plots.implicit_prior_ellipse(prior, posterior, task=0)
    path = plots.save(figure, out / "implicit_prior.png")
    return ["", f"MAML's implicit prior ({inner.num_steps} steps of size {inner.step_size:.4g}) "
            "and its task posterior, task 0, at the MAML globals:", "",
            f"![implicit prior]({path.name})"]


_LONG_INFO = ("inactive_sites", "boundary_sites", "inactive_reason", "task_posterior")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


def _report(args, zoo, data, results, table: str, total: float, sections: list[str],
            caption: str | None = None) -> str:
    num_tasks = len(data.task_labels) if data.task_labels else "?"
    lines = [
        f"# hbmeta compare {args.model}",
        "",
        f"{zoo.summary}. {num_tasks} tasks; seed {args.seed}; "
        f"{'small' if args.small else 'default'} size.",
        "",
        "Global estimates. Empirical-Bayes methods give point estimates (type-II maximum "
        "likelihood); NUTS gives the posterior mean ± sd. 'exact EB' maximises the "
        "closed-form evidence." if zoo.exact_type2_ml is not None
        else caption or "Global estimates.",
        "",
        table,
        "",
        "| method | wall time (s) | notes |",
        "|---|---|---|",
    ]
    for r in results:
        inactive = r.info.get("inactive_sites", ())
        boundary = r.info.get("boundary_sites", ())
        notes = ", ".join(f"{k}={_short(v)}" for k, v in r.info.items() if k not in _LONG_INFO)
        if inactive:
            notes += (f"; **{', '.join(inactive)} not estimated** (not in objective: the "
                      f"{r.method} objective does not depend on it; NaN in the InferenceData "
                      "and not scored against NUTS)")
        if "task_posterior" in r.info:
            notes += f"; **task posterior {r.info['task_posterior']}**"
        if boundary:
            notes += (f"; **{', '.join(boundary)} at the boundary 0** (EB collapses the "
                      "hierarchy; remedies: a hyperprior (MAP-II) or NUTS over the globals)")
        lines.append(f"| {r.method} | {r.wall_time:.1f} | {notes} |")
    if not zoo.laplace_exact and any(r.method == "laplace" for r in results):
        lines += ["", "Laplace is approximate for this model (tasks are not Gaussian)."]
    lines += sections
    lines += ["", f"Total wall time {total:.1f} s."]
    return "\n".join(lines) + "\n"


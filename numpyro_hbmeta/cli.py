"""The ``hbmeta`` command line.

``hbmeta models`` lists the zoo; ``hbmeta compare MODEL`` fits one zoo model with each
method, prints the table of global estimates and writes ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hbmeta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo")
    compare = sub.add_parser("compare", help="fit a zoo model with several methods")
    compare.add_argument("model", help="zoo model name (see `hbmeta models`)")
    compare.add_argument("--methods", default="maml,laplace,nuts",
                         help="comma-separated methods (default: maml,laplace,nuts)")
    compare.add_argument("--out", default="hbmeta_out", help="output folder")
    compare.add_argument("--seed", type=int, default=0, help="random seed")
    compare.add_argument("--small", action="store_true", help="a seconds-sized run")
    compare.add_argument("--no-progress", action="store_true", help="hide progress bars")
    compare.add_argument("--x64", action="store_true", help="compute in float64")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import numpyro

    # Must precede the first JAX computation: lets NUTS run chains in parallel on CPU cores.
    numpyro.set_host_device_count(min(4, os.cpu_count() or 1))
    if getattr(args, "x64", False):
        numpyro.enable_x64()
    from numpyro_hbmeta import models

    if args.command == "models":
        for name, summary in models.available().items():
            print(f"{name:16s} {summary}")
        return 0
    return _compare(args, models)


def _compare(args: argparse.Namespace, models) -> int:
    import time
    from pathlib import Path

    import jax

    from numpyro_hbmeta.methods import METHODS, run_method
    from numpyro_hbmeta.report import global_table, markdown_table

    zoo = models.get_model(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"hbmeta: unknown method(s) {unknown}; available: {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    key_data, key_fit = jax.random.split(jax.random.PRNGKey(args.seed))
    data = zoo.load_data(key_data, small=args.small)
    supported = getattr(zoo, "COMPARE_METHODS", None)
    if supported is not None and set(methods) - set(supported):
        print(f"hbmeta: compare supports {list(supported) or 'no method'} for {args.model} "
              f"(see the model's docstring), not {sorted(set(methods) - set(supported))}",
              file=sys.stderr)
        return 2
    if data.query is None and any(m in ("maml", "llama") for m in methods):
        skipped = [m for m in methods if m in ("maml", "llama")]
        print(f"hbmeta: {args.model} has no query set; skipping {', '.join(skipped)} "
              "(they score held-out query data)", file=sys.stderr)
        methods = [m for m in methods if m not in skipped]
    results = []
    for name, key in zip(methods, jax.random.split(key_fit, len(methods)), strict=True):
        print(f"== {name}", flush=True)
        results.append(run_method(name, zoo, data, key, small=args.small,
                                  progress_bar=not args.no_progress))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caption, extra = None, []
    if hasattr(zoo, "compare_report"):  # a model whose globals table says nothing (sinusoid)
        caption, table, extra = zoo.compare_report(results, data, out)
    else:
        exact = zoo.exact_type2_ml(data.all_data()) if hasattr(zoo, "exact_type2_ml") else None
        header, rows = global_table(results, zoo.GLOBALS, truth=data.truth, exact=exact)
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

    from numpyro_hbmeta import plots
    from numpyro_hbmeta.compare import compare, summary_table
    from numpyro_hbmeta.inference_data import to_inference_data

    lines = []
    # Results without task draws (FIT["task_draws"] = False) have no task posterior to export.
    exported = [r for r in results if set(zoo.TASK_SITES) <= set(r.samples)]
    for result in exported:
        idata = to_inference_data(result, task_labels=data.task_labels)
        idata.to_netcdf(out / f"{result.method}.nc")
        if "diverging" in result.sample_stats:
            summary = az.summary(idata, var_names=list(zoo.GLOBALS), kind="diagnostics")
            lines += ["", f"NUTS diagnostics ({result.method}): "
                      f"{result.info.get('divergences', 0)} divergences; R-hat and bulk ESS:",
                      "", summary[["r_hat", "ess_bulk"]].to_markdown()
                      if _has_tabulate() else "```\n" + summary.to_string() + "\n```"]
    if exported:
        lines += ["", "InferenceData (netCDF): " + ", ".join(f"`{r.method}.nc`"
                                                          for r in exported)]
    for site in [s for s in zoo.TASK_SITES[:1] if all(s in r.samples for r in results)]:
        figure = plots.forest(results, site, task_labels=data.task_labels)
        path = plots.save(figure, out / f"forest_{site}.png")
        lines += ["", f"Task effects `{site}` by method (50% and 90% intervals):", "",
                  f"![forest]({path.name})"]
    lines += _implicit_prior_figure(results, zoo, data, out)
    if any(r.method == "nuts" for r in results) and len(results) > 1:
        frame = compare(results, reference="nuts")
        text = summary_table(frame).to_string()
        print("\nAgainst NUTS (|Δmean| in NUTS sd, sd ratio, 90% coverage of NUTS draws):")
        print(text)
        lines += ["", "Against NUTS on the full model, site by site (task sites averaged "
                  "over tasks):", "", "```", text, "```"]
    return lines


def _implicit_prior_figure(results, zoo, data, out) -> list[str]:
    """For MAML on a model with 2-D tasks: the implicit prior of K steps of size β at the
    fitted globals against the MAML task posterior (Grant et al. 2018, Fig. 2)."""
    import numpy as np

    from numpyro_hbmeta import plots
    from numpyro_hbmeta.eb import MetaEB
    from numpyro_hbmeta.implicit_prior import implicit_prior
    from numpyro_hbmeta.inner import TruncatedGD
    from numpyro_hbmeta.methods import settings

    maml = next((r for r in results if r.method == "maml"), None)
    if maml is None or not set(zoo.TASK_SITES) <= set(maml.samples):  # no task draws
        return []
    params = {k: np.asarray(v)[0, 0] for k, v in maml.samples.items() if k in maml.point_sites}
    s = settings(zoo, small=False)
    inner = TruncatedGD(s["maml_steps"], s["maml_step_size"])
    prior = implicit_prior(zoo.model, params, data.support, inner)
    if prior.event_shape != (2,):
        return []
    posterior = MetaEB(zoo.model, inner=inner, objective="maml").task_posterior(params,
                                                                                data.support)
    figure = plots.implicit_prior_ellipse(prior, posterior, task=0)
    path = plots.save(figure, out / "implicit_prior.png")
    return ["", f"MAML's implicit prior ({inner.num_steps} steps of size {inner.step_size}) "
            "and its task posterior, task 0, at the MAML globals:", "",
            f"![implicit prior]({path.name})"]


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


def _report(args, zoo, data, results, table: str, total: float, sections: list[str],
            caption: str | None = None) -> str:
    num_tasks = len(data.task_labels) if data.task_labels else "?"
    lines = [
        f"# hbmeta compare {args.model}",
        "",
        f"{zoo.SUMMARY}. {num_tasks} tasks; seed {args.seed}; "
        f"{'small' if args.small else 'default'} size.",
        "",
        "Global estimates. Empirical-Bayes methods give point estimates (type-II maximum "
        "likelihood); NUTS gives the posterior mean ± sd. 'exact EB' maximises the "
        "closed-form evidence." if hasattr(zoo, "exact_type2_ml")
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
        notes = ", ".join(f"{k}={v}" for k, v in r.info.items()
                          if k not in ("inactive_sites", "boundary_sites"))
        if inactive:
            notes += f"; not in objective: {', '.join(inactive)}"
        if boundary:
            notes += (f"; **{', '.join(boundary)} at the boundary 0** (EB collapses the "
                      "hierarchy; remedies: a hyperprior (MAP-II) or NUTS over the globals)")
        lines.append(f"| {r.method} | {r.wall_time:.1f} | {notes} |")
    if not getattr(zoo, "LAPLACE_EXACT", False) and any(r.method == "laplace" for r in results):
        lines += ["", "Laplace is approximate for this model (tasks are not Gaussian)."]
    lines += sections
    lines += ["", f"Total wall time {total:.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Sinusoid regression: MAML vs LLAMA (K-FAC and diagonal curvature) vs NUTS.

Grant et al. (ICLR 2018, §5.1, Fig. 3) meta-train MAML and LLAMA on sinusoid tasks and show
LLAMA's Laplace posterior over each new task's network weights as function samples with
bands. This script does that with the zoo's 1-40-40-1 ReLU net
(:mod:`numpyro_hbmeta.models.sinusoid`) and adds a gold reference: NUTS on the exact task
posterior the Laplace approximation stands for,

    p(φ_j | support_j, θ̂) ∝ N(φ_j; θ̂, τ² I) Π_n N(y_n; f(x_n; φ_j), σ²),

on a handful of held-out tasks, at the meta-learned θ̂ (LLAMA-kfac's). τ² = K β, the
variance that K inner steps of size β leave a direction the data do not constrain (Santos
1996; Grant et al. §3.2), so LLAMA's damping δ = 1/τ² is the prior precision of that same
posterior.

For each number of shots (support points per task) and each method it meta-trains θ on a
pool of simulated tasks (MetaEB, Adam, minibatches of tasks) and scores held-out tasks:

* query MSE of the predictive mean against the noise-free function;
* predictive log-likelihood per query point: MAML's plug-in N(y; f(x; φ̂), σ²), LLAMA's
  linearised Laplace predictive N(y; f(x; φ̂), σ² + J Ĥ⁻¹ Jᵀ), NUTS's mixture over draws;
* coverage of the central 90% predictive interval of y, and of the true function by the
  90% band of f.

Observations carry the model's own noise σ = 0.5 by default (``--data-noise``), so the
predictive of y can be calibrated at all; MAML's benchmark is noise-free (``--data-noise 0``).

Writes ``OUT/report.md``, ``OUT/functions.png`` (the paper-style figure),
``OUT/predictive_sd.png`` and ``OUT/predictions.npz`` (the query-point predictions the
table is computed from).

    python experiments/sinusoid.py --out sinusoid_out            # a few minutes on 2 cores
    python experiments/sinusoid.py --full --out sinusoid_full    # the larger run
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import numpyro_hbmeta as hbm
from numpyro_hbmeta import plots
from numpyro_hbmeta.models import sinusoid
from numpyro_hbmeta.output.report import markdown_table

METHODS = ("maml", "llama-kfac", "llama-diag")
# The task pool is reused across meta-iterations: MetaEB.run's eager model check costs
# ~35 s on 1000 sinusoid tasks (more than 600 meta-iterations), so the small run keeps 200.
SMALL = {"train_tasks": 200, "meta_steps": 600, "test_tasks": 100, "nuts_tasks": 3,
         "nuts_warmup": 200, "nuts_samples": 200}
FULL = {"train_tasks": 1000, "meta_steps": 5000, "test_tasks": 500, "nuts_tasks": 8,
        "nuts_warmup": 500, "nuts_samples": 500}
LEVEL = 0.9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sinusoid_out", help="output folder")
    parser.add_argument("--full", action="store_true", help="the larger run (see FULL)")
    parser.add_argument("--shots", default="5,10", help="support points per task, e.g. 5,10")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {METHODS}")
    for name, help_ in (("train_tasks", "meta-training task pool"),
                        ("meta_steps", "meta-iterations (Adam steps)"),
                        ("test_tasks", "held-out tasks scored"),
                        ("nuts_tasks", "held-out tasks with a NUTS reference (0: none)"),
                        ("nuts_warmup", "NUTS warm-up per chain"),
                        ("nuts_samples", "NUTS draws per chain")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"{help_} (default {SMALL[name]}, --full {FULL[name]})")
    parser.add_argument("--task-batch", type=int, default=25, help="tasks per meta-iteration")
    parser.add_argument("--query-points", type=int, default=25,
                        help="held-out query points per test task")
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="Adam step")
    parser.add_argument("--eta", type=float, default=1e-6, help="LLAMA's η (paper: 1e-6)")
    parser.add_argument("--data-noise", type=float, default=sinusoid.NOISE,
                        help="sd of the observation noise in the simulated data")
    parser.add_argument("--grid", type=int, default=100, help="x grid points in the figures")
    parser.add_argument("--draws", type=int, default=200, help="Laplace function draws")
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in (FULL if args.full else SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shots = [int(s) for s in args.shots.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    if args.nuts_tasks > args.test_tasks:
        parser.error("--nuts-tasks cannot exceed --test-tasks")
    return args


class Setting(NamedTuple):
    """What one number of shots fixes: the inner loop, the prior scale, the data."""

    shots: int
    inner: hbm.TruncatedGD
    tau: float
    train: hbm.TaskData
    test: hbm.TaskData
    grid: jnp.ndarray  # (test tasks, grid points, 1)


def make_setting(args, shots: int, rng_key) -> Setting:
    """Inner loop K = 5 steps of β(shots), τ² = Kβ, training and held-out tasks."""
    inner = hbm.TruncatedGD(sinusoid.FIT["maml_steps"], sinusoid.step_size(shots))
    tau = math.sqrt(inner.num_steps * inner.step_size)
    key_train, key_test = jax.random.split(rng_key)
    train = sinusoid.simulate(key_train, num_tasks=args.train_tasks, shots=shots,
                              num_query=shots, noise=args.data_noise)
    test = sinusoid.simulate(key_test, num_tasks=args.test_tasks, shots=shots,
                             num_query=args.query_points, noise=args.data_noise)
    grid = jnp.broadcast_to(jnp.linspace(*sinusoid.INPUT, args.grid)[None, :, None],
                            (args.test_tasks, args.grid, 1))
    return Setting(shots, inner, tau, train, test, grid)


def method_spec(method: str, tau: float) -> tuple[str, Any]:
    """(objective, curvature) of a method; the curvature's damping is the prior 1/τ²."""
    damping = 1.0 / tau**2
    return {"maml": ("maml", None),
            "llama-kfac": ("llama", hbm.KFAC(damping=damping)),
            "llama-diag": ("llama", sinusoid.DiagGGN(damping=damping))}[method]


def meta_train(args, setting: Setting, method: str, rng_key) -> dict[str, Any]:
    """MetaEB on the training pool; returns the globals, the loss curve and the wall time."""
    objective, curvature = method_spec(method, setting.tau)
    driver = hbm.MetaEB(sinusoid.model, inner=setting.inner, objective=objective,
                        curvature="full" if curvature is None else curvature,
                        optimizer=optax.adam(args.learning_rate), eta=args.eta)
    key_init, key_run = jax.random.split(rng_key)
    start = time.perf_counter()
    fit = driver.run(key_run, args.meta_steps, setting.train.support, setting.train.query,
                     task_batch_size=min(args.task_batch, args.train_tasks),
                     init_params=sinusoid.init_params(key_init), progress_bar=False)
    return {"params": fit.params, "losses": np.asarray(fit.losses),
            "seconds": time.perf_counter() - start}


def evaluate(args, setting: Setting, method: str, params, rng_key) -> sinusoid.Predictive:
    """The method's predictive at the query points followed by the figure grid."""
    _, curvature = method_spec(method, setting.tau)
    x = jnp.concatenate([setting.test.query["x"], setting.grid], axis=1)
    return sinusoid.laplace_predictive(params, setting.test.support, x, inner=setting.inner,
                                       curvature=curvature, rng_key=rng_key,
                                       num_samples=args.draws)


def take(predictive: sinusoid.Predictive, tasks: slice, points: slice) -> sinusoid.Predictive:
    """The predictive restricted to some tasks and points."""
    return predictive.select(tasks, points)


def nuts_reference(args, setting: Setting, theta, rng_key):
    """NUTS on the first ``nuts_tasks`` held-out tasks at θ̂ with prior N(θ̂, τ²I)."""
    net = sinusoid.SinusoidNet(tau=setting.tau)
    support = {k: v[:args.nuts_tasks] for k, v in setting.test.support.items()}
    reference = sinusoid.nuts_task_posterior(
        net, theta, support, rng_key, num_warmup=args.nuts_warmup,
        num_samples=args.nuts_samples, num_chains=args.nuts_chains)
    x = jnp.concatenate([setting.test.query["x"], setting.grid], axis=1)[:args.nuts_tasks]
    return reference, sinusoid.nuts_predictive(net, reference.phi, x)


def metrics_row(setting: Setting, predictive, tasks: slice, q: int) -> dict[str, float]:
    query = take(predictive, tasks, slice(0, q))
    f_true = sinusoid.true_function(setting.test.truth, setting.test.query["x"])[tasks]
    return sinusoid.predictive_metrics(query, setting.test.query["y"][tasks], f_true,
                                       level=LEVEL)


# -- figures ------------------------------------------------------------------------------
def function_figure(settings, predictives, nuts, num_panels: int, q: int):
    """Grant et al. (2018) Fig. 3 style: per held-out task, the support points, the true
    function, MAML's prediction, LLAMA-kfac function draws with a 90% band and the NUTS band."""
    fig, axes = plt.subplots(len(settings), num_panels, figsize=(4.2 * num_panels,
                                                                 3.3 * len(settings)),
                             squeeze=False, sharex=True)
    for row, setting in enumerate(settings):
        x = np.asarray(setting.grid[0, :, 0])
        for col in range(num_panels):
            ax = axes[row, col]
            truth = sinusoid.true_function(setting.test.truth, setting.grid)[col]
            ax.plot(x, truth, color="black", lw=1.5, label="true function")
            llama = predictives[setting.shots].get("llama-kfac")
            if llama is not None:
                grid_part = take(llama, slice(col, col + 1), slice(q, None))
                low, high = grid_part.function_interval(LEVEL)
                ax.fill_between(x, low[0], high[0], color="C0", alpha=0.25, lw=0,
                                label="LLAMA-kfac 90% band")
                for draw in np.asarray(grid_part.function_draws[:8, 0]):
                    ax.plot(x, draw, color="C0", lw=0.6, alpha=0.7)
                ax.plot([], [], color="C0", lw=0.6, label="LLAMA-kfac draws")
            maml = predictives[setting.shots].get("maml")
            if maml is not None:
                ax.plot(x, maml.mean[col, q:], color="C3", lw=1.5, ls="--", label="MAML")
            if setting.shots in nuts and col < nuts[setting.shots].mean.shape[0]:
                grid_part = take(nuts[setting.shots], slice(col, col + 1), slice(q, None))
                low, high = grid_part.function_interval(LEVEL)
                ax.plot(x, low[0], color="C1", lw=1.2, ls=":")
                ax.plot(x, high[0], color="C1", lw=1.2, ls=":", label="NUTS 90% band")
            ax.plot(setting.test.support["x"][col, :, 0], setting.test.support["y"][col],
                    "o", color="black", ms=5, mfc="white", label="support points")
            ax.set_title(f"{setting.shots}-shot, held-out task {col}")
            ax.set_ylim(-6.5, 6.5)
            ax.set_xlabel("x")
            ax.set_ylabel("y")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    return fig


def sd_figure(settings, predictives, nuts, q: int):
    """The sd of f(x) along x on the first NUTS task: K-FAC vs diagonal Laplace vs NUTS."""
    fig, axes = plt.subplots(1, len(settings), figsize=(5.0 * len(settings), 3.5),
                             squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        x = np.asarray(setting.grid[0, :, 0])
        for method, color in (("llama-kfac", "C0"), ("llama-diag", "C2")):
            if method in predictives[setting.shots]:
                sd = predictives[setting.shots][method].function_sd[0, q:]
                ax.plot(x, sd, color=color, label=f"{method} (linearised Laplace)")
        if setting.shots in nuts:
            ax.plot(x, nuts[setting.shots].function_sd[0, q:], color="C1", ls=":",
                    label="NUTS (exact posterior)")
        ax.plot(setting.test.support["x"][0, :, 0], np.zeros(setting.shots), "|",
                color="black", ms=12, label="support x")
        ax.set_title(f"{setting.shots}-shot, held-out task 0: posterior sd of f(x)")
        ax.set_xlabel("x")
        ax.set_ylabel("sd of f(x)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# -- the report ---------------------------------------------------------------------------
HEADER = ["shots", "method", "query MSE", "log-lik / point", "90% coverage of y",
          "90% coverage of f", "mean predictive sd", "meta-training (s)"]


def fmt_row(shots, method, m: dict[str, float], seconds) -> list[str]:
    return [str(shots), method, f"{m['mse']:.3f}", f"{m['log_lik']:.3f}",
            f"{m['coverage']:.3f}", f"{m['f_coverage']:.3f}", f"{m['sd']:.3f}",
            "—" if seconds is None else f"{seconds:.1f}"]


def write_report(args, out: Path, rows, nuts_rows, nuts_info, total: float) -> str:
    lines = [
        "# Sinusoid: MAML vs LLAMA vs NUTS",
        "",
        f"Command: `python experiments/sinusoid.py {' '.join(args.argv)}`",
        "",
        f"1-40-40-1 ReLU net (NTK parametrisation), {sinusoid.FIT['maml_steps']} inner steps "
        "of size β = 0.03/shots, second-order MAML; meta-training on "
        f"{args.train_tasks} simulated tasks, {args.meta_steps} Adam steps "
        f"(learning rate {args.learning_rate}) on minibatches of {args.task_batch} tasks; "
        f"LLAMA's η = {args.eta:g}. Observation noise in the data: sd {args.data_noise} "
        f"(the model's σ = {sinusoid.NOISE}). Held-out: {args.test_tasks} tasks, "
        f"{args.query_points} query points each. Prior scale τ² = Kβ; LLAMA's damping 1/τ².",
        "",
        "Query MSE: of the predictive mean against the noise-free function. log-lik / point: "
        "mean of log p(y_n | support). Coverage of y: fraction of noisy query observations in "
        "the central 90% predictive interval; of f: fraction of true function values in the "
        "90% band of f (0 for MAML's point prediction).",
        "",
        "## Held-out tasks",
        "",
        markdown_table(HEADER, rows),
        "",
        "`maml (no adaptation)` predicts with θ̂ itself (zero inner steps): the inner loop "
        "must beat it.",
    ]
    if nuts_rows:
        lines += [
            "",
            f"## Against NUTS on the first {args.nuts_tasks} held-out tasks",
            "",
            "NUTS samples the exact task posterior N(φ; θ̂, τ²I) × likelihood of the support "
            "set at LLAMA-kfac's θ̂ (all 1761 weights of each task), "
            f"{args.nuts_chains} chains × {args.nuts_samples} draws after {args.nuts_warmup} "
            "warm-up.",
            "",
            markdown_table([*HEADER[:-1], "NUTS diagnostics"], nuts_rows),
        ]
        for shots, info in nuts_info.items():
            lines.append(f"\nNUTS, {shots}-shot: {info}")
    lines += ["", "## Figures", "",
              "![functions](functions.png)", "",
              "Per held-out task: support points, true function, MAML's prediction (dashed "
              "red), LLAMA-kfac draws of f with the 90% band of f (blue) and the NUTS 90% "
              "band (dotted orange).", "",
              "![predictive sd](predictive_sd.png)", "",
              "The posterior sd of f(x) on held-out task 0 under the K-FAC and diagonal "
              "Laplace approximations and under NUTS.", "",
              f"Total wall time {total:.1f} s."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    root = jax.random.PRNGKey(args.seed)
    settings, predictives, nuts, rows, nuts_rows, nuts_info, saved = [], {}, {}, [], [], {}, {}
    q = args.query_points
    every, first = slice(None), slice(0, args.nuts_tasks)
    for shots in args.shots:
        key_data, key_train, key_eval, key_nuts = jax.random.split(jax.random.fold_in(root,
                                                                                     shots), 4)
        setting = make_setting(args, shots, key_data)
        settings.append(setting)
        predictives[shots], fits = {}, {}
        for method in args.methods:
            print(f"== {shots}-shot {method}: meta-training", flush=True)
            fits[method] = meta_train(args, setting, method, key_train)
            predictives[shots][method] = evaluate(args, setting, method,
                                                  fits[method]["params"], key_eval)
        if "maml" in fits:
            baseline = sinusoid.laplace_predictive(
                fits["maml"]["params"], setting.test.support, setting.test.query["x"],
                inner=hbm.TruncatedGD(0, setting.inner.step_size))
            rows.append(fmt_row(shots, "maml (no adaptation)",
                                metrics_row(setting, baseline, every, q), None))
        for method in args.methods:
            pred = predictives[shots][method]
            rows.append(fmt_row(shots, method, metrics_row(setting, pred, every, q),
                                fits[method]["seconds"]))
            saved[f"{shots}/{method}/mean"] = np.asarray(pred.mean[:, :q])
            saved[f"{shots}/{method}/sd"] = np.asarray(pred.y_sd[:, :q])
        saved[f"{shots}/f_true"] = np.asarray(
            sinusoid.true_function(setting.test.truth, setting.test.query["x"]))
        saved[f"{shots}/y"] = np.asarray(setting.test.query["y"])
        if args.nuts_tasks:
            reference_method = "llama-kfac" if "llama-kfac" in fits else args.methods[0]
            print(f"== {shots}-shot NUTS on {args.nuts_tasks} tasks", flush=True)
            reference, nuts[shots] = nuts_reference(
                args, setting, fits[reference_method]["params"]["theta"], key_nuts)
            diagnostics = (f"{reference.divergences} divergences, max R-hat "
                           f"{reference.max_r_hat:.3f}, min ESS {reference.min_ess:.0f}"
                           + (f" ({reference.undefined_ess} weights with undefined ESS)"
                              if reference.undefined_ess else "")
                           + f", {reference.wall_time:.0f} s")
            nuts_info[shots] = diagnostics + f" (at {reference_method}'s θ̂)"
            for method in args.methods:
                m = metrics_row(setting, predictives[shots][method], first, q)
                nuts_rows.append([*fmt_row(shots, method, m, None)[:-1], ""])
            m = metrics_row(setting, nuts[shots], first, q)
            nuts_rows.append([*fmt_row(shots, "NUTS (exact)", m, None)[:-1], diagnostics])
            saved[f"{shots}/nuts/mean"] = np.asarray(nuts[shots].mean[:, :q])
    np.savez(out / "predictions.npz", **saved)
    panels = min(3, args.test_tasks)
    plots.save(function_figure(settings, predictives, nuts, panels, q), out / "functions.png")
    plots.save(sd_figure(settings, predictives, nuts, q), out / "predictive_sd.png")
    plt.close("all")
    text = write_report(args, out, rows, nuts_rows, nuts_info, time.perf_counter() - start)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""The ``hbmeta`` command line end to end: argument errors, --help, every zoo model's
defaults, output off a terminal."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from numpyro_hbmeta import models
from numpyro_hbmeta.cli import main
from numpyro_hbmeta.infer.methods import DESCRIPTIONS, METHODS


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    assert "linear" in capsys.readouterr().out


def test_help_lists_models_and_methods(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for name in models.ZOO:
        assert f"  {name} " in out and models.get_zoo_model(name).summary in out
    for method, text in DESCRIPTIONS.items():
        assert f"  {method} " in out and text in out
    assert set(DESCRIPTIONS) == set(METHODS)


def _fails(argv, capsys, *needles):
    """Exit status 2, one clear message on stderr naming ``needles``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_model_lists_the_zoo(tmp_path, capsys):
    _fails(["compare", "nope", "--out", str(tmp_path)], capsys, "unknown model 'nope'",
           *models.ZOO)


@pytest.mark.parametrize(("methods", "needle"), [
    ("", "names no method"), (" , ", "names no method"), ("magic", "unknown method(s) magic"),
    ("maml,maml", "more than once")])
def test_bad_methods_list_the_supported_ones(tmp_path, capsys, methods, needle):
    _fails(["compare", "linear", "--methods", methods, "--out", str(tmp_path)], capsys, needle,
           "supported methods for linear: maml, llama, laplace, nuts")


def test_unsupported_method_is_refused(tmp_path, capsys):
    _fails(["compare", "sinusoid", "--methods", "maml,nuts", "--out", str(tmp_path)], capsys,
           "sinusoid does not support nuts", "supported methods for sinusoid: maml, llama")


def test_bad_seed_and_unknown_flag(tmp_path, capsys):
    _fails(["compare", "linear", "--seed", "-1", "--out", str(tmp_path)], capsys, "--seed")
    _fails(["compare", "linear", "--seed", "x"], capsys, "invalid int value")
    _fails(["compare", "linear", "--frobnicate"], capsys, "unrecognized arguments")


def test_unwritable_out_fails_before_any_fit(tmp_path, capsys, monkeypatch):
    import numpyro_hbmeta.infer.methods as methods

    def no_fit(*args, **kwargs):
        raise AssertionError("a fit was started")

    monkeypatch.setattr(methods, "run_method", no_fit)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails(["compare", "linear", "--out", str(blocker / "sub")], capsys,
           "is not a writable folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if not (readonly / "probe").parent.stat().st_mode & 0o200:  # root ignores permissions
        try:
            (readonly / "probe").write_text("")
        except PermissionError:
            _fails(["compare", "linear", "--out", str(readonly)], capsys,
                   "is not a writable folder")


def test_compile_cache_is_off_unless_asked_for(tmp_path, monkeypatch, capsys):
    import jax

    from numpyro_hbmeta.cli.main import _use_compile_cache

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert _use_compile_cache(None) == str(tmp_path / "env")  # JAX reads the variable itself
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert _use_compile_cache(None) is None and _use_compile_cache("") is None
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = _use_compile_cache(str(tmp_path / "cache"))
        assert folder == str(tmp_path / "cache")
        assert Path(folder).is_dir() and jax.config.jax_compilation_cache_dir == folder
        blocked = tmp_path / "file"
        blocked.write_text("")
        assert _use_compile_cache(str(blocked / "cache")) is None  # cannot be created
        assert "no compilation cache" in capsys.readouterr().err
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "numpyro_hbmeta.cli", "models"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert "linear" in result.stdout


class SmallRun(NamedTuple):
    """What ``hbmeta compare MODEL --small`` left: exit status, stdout, stderr, its folder."""

    status: int
    out: str
    err: str
    folder: Path
    report: str


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """``small_run(model)``: ``hbmeta compare MODEL --small`` with the model's default methods,
    run once per model in this process (compiled code is shared between models) and read by
    several tests. Output goes to in-memory streams, which, like a pipe, are not terminals."""
    runs: dict[str, SmallRun] = {}

    def run(model: str) -> SmallRun:
        if model not in runs:
            folder = tmp_path_factory.mktemp(model)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(["compare", model, "--small", "--out", str(folder)])
            report = (folder / "report.md").read_text() if status == 0 else ""
            runs[model] = SmallRun(status, out.getvalue(), err.getvalue(), folder, report)
        return runs[model]

    return run


def _ran(model):
    """The default methods that run: MAML and LLAMA score a query set, which eight schools
    lacks."""
    zoo = models.get_zoo_model(model)
    return [m for m in zoo.default_methods if m not in ("maml", "llama")
            or model != "eight_schools"]


@pytest.mark.slow
@pytest.mark.parametrize("model", models.ZOO)
def test_compare_default_methods_small(small_run, model):
    """`hbmeta compare MODEL --small` with the model's own default methods succeeds, off a
    terminal: no tqdm bars (their \\r repeats pile up in logs) but a plain start and finish
    line per method, and a report row per method."""
    zoo = models.get_zoo_model(model)
    assert set(zoo.default_methods) <= set(METHODS)
    run = small_run(model)
    assert run.status == 0, run.err[-2000:]
    assert "\r" not in run.err and "\r" not in run.out
    for method in _ran(model):
        assert f"hbmeta: {method} started" in run.err and f"hbmeta: {method} done in" in run.err
        assert f"| {method} |" in run.report


STATISTICAL = [m for m in models.ZOO if models.get_zoo_model(m).compare_report is None]
NETWORKS = [m for m in models.ZOO if m not in STATISTICAL]


@pytest.mark.slow
@pytest.mark.parametrize("model", NETWORKS)
def test_compare_networks_report_heldout_not_globals(small_run, model):
    """Networks: a held-out predictive report, no table of weights, no netCDF."""
    run = small_run(model)
    assert "theta[" not in run.report and not list(run.folder.glob("*.nc"))


@pytest.mark.slow
@pytest.mark.parametrize("model", STATISTICAL)
def test_compare_exports_against_nuts(small_run, model):
    """Statistical models: the comparison against NUTS with R-hat, netCDF with a task
    dimension for Laplace and NUTS, the forest figure, and τ of MAML not estimated."""
    import arviz as az

    run = small_run(model)
    assert "Against NUTS" in run.report and "R-hat" in run.report
    for method in ("laplace", "nuts"):
        idata = az.from_netcdf(run.folder / f"{method}.nc")
        assert "tasks" in idata.posterior.dims
    assert next(run.folder.glob("forest_*.png")).stat().st_size > 10_000
    if "maml" in _ran(model):
        # τ is not in MAML's objective: reported as not estimated, never scored
        assert "tau not estimated" in run.report and "NaN: not estimated" in run.out
        maml = run.folder / "maml.nc"
        if maml.exists():
            maml = az.from_netcdf(maml)
            assert maml.posterior.attrs["inactive_sites"] == "tau"
            assert np.isnan(maml.posterior["tau"].values).all()


@pytest.mark.slow
def test_compare_eight_schools_reports_the_boundary(small_run):
    assert "tau at the boundary 0" in small_run("eight_schools").report


@pytest.mark.slow
def test_compare_logistic_says_laplace_is_approximate(small_run):
    assert "Laplace is approximate" in small_run("logistic").report


@pytest.mark.slow
def test_compare_linear_laplace_is_exact_eb_and_draws_the_implicit_prior(small_run):
    run = small_run("linear")
    _laplace_equals_exact_eb(run.report)
    # 2-D tasks: the implicit-prior ellipses, unless MAML's task posterior was not
    # formed (β·λ ≥ 1 at the fitted σ), which the report then says
    figure = run.folder / "implicit_prior.png"
    assert figure.exists() != ("task posterior not formed" in run.report)
    assert not figure.exists() or figure.stat().st_size > 10_000


@pytest.mark.slow
def test_compare_linear_exports_real_fits_in_the_arviz_layout(small_run):
    """Real NUTS and Laplace fits through the export (tests/output/test_inference_data.py checks the
    exporter on hand-made results): labelled task dimension, pointwise log-likelihood,
    sampler statistics, point globals and per-task diagnostics."""
    import arviz as az

    run = small_run("linear")
    labels = models.get_zoo_model("linear").load_data(small=True).task_labels
    nuts = az.from_netcdf(run.folder / "nuts.nc")
    assert nuts.posterior["phi"].dims == ("chain", "draw", "tasks", "phi_dim_0")
    assert list(nuts.posterior["phi"].coords["tasks"].values) == labels
    assert nuts.log_likelihood["y"].dims == ("chain", "draw", "tasks", "points")
    assert nuts.sample_stats["diverging"].dims == ("chain", "draw")
    assert nuts.attrs["method"] == "nuts" and nuts.attrs["point_sites"] == ""
    laplace = az.from_netcdf(run.folder / "laplace.nc")
    assert laplace.attrs["approximate"].startswith("point estimate")
    assert np.ptp(laplace.posterior["theta"].values, axis=(0, 1)).max() == 0.0
    assert np.ptp(laplace.posterior["phi"].values, axis=(0, 1)).min() > 0
    assert laplace.sample_stats["inner_grad_norm"].dims == ("chain", "draw", "tasks")


def test_compare_through_real_pipes(tmp_path):
    """The installed module run as a CI log runs it: stdout and stderr are pipes, so no
    progress bars (no \\r) but plain start and finish lines. One cheap method: the default
    methods of every model run in-process above."""
    argv = ["compare", "eight_schools", "--small", "--methods", "laplace", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "numpyro_hbmeta.cli", *argv],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "hbmeta: laplace started" in result.stderr
    assert "hbmeta: laplace done in" in result.stderr
    assert "| laplace |" in (tmp_path / "report.md").read_text()


def _laplace_equals_exact_eb(report):
    """Laplace EB is exact type-II ML on the linear model: its column equals the exact one
    to print precision."""
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| theta")]
    header = next(line.split("|") for line in report.splitlines() if line.startswith("| site"))
    exact_col = [c.strip() for c in header].index("exact EB")
    laplace_col = [c.strip() for c in header].index("laplace")
    assert rows
    for row in rows:
        assert abs(float(row[exact_col]) - float(row[laplace_col])) <= 0.002

"""The ``hbmeta`` command line end to end: argument errors, --help, every zoo model's
defaults, output off a terminal."""

import subprocess
import sys

import numpy as np
import pytest

from numpyro_hbmeta import models
from numpyro_hbmeta.cli import main
from numpyro_hbmeta.methods import DESCRIPTIONS, METHODS


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
    import numpyro_hbmeta.methods as methods

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


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "numpyro_hbmeta.cli", "models"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert "linear" in result.stdout


@pytest.mark.parametrize("model", models.ZOO)
def test_compare_default_methods_small(tmp_path, model, capsys):
    """`hbmeta compare MODEL --small` with the model's own default methods succeeds."""
    import arviz as az

    zoo = models.get_zoo_model(model)
    assert set(zoo.default_methods) <= set(METHODS)
    argv = ["compare", model, "--small", "--out", str(tmp_path)]
    if model == "eight_schools":  # through real pipes, as in a CI log
        result = subprocess.run([sys.executable, "-m", "numpyro_hbmeta.cli", *argv],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        out, err = result.stdout, result.stderr
    else:
        assert main(argv) == 0
        out, err = capsys.readouterr()
    # Off a terminal: no tqdm bars (their \r repeats pile up in logs) but plain lines.
    assert "\r" not in err and "\r" not in out
    first = zoo.default_methods[-1]
    assert f"hbmeta: {first} started" in err and f"hbmeta: {first} done in" in err
    report = (tmp_path / "report.md").read_text()
    ran = [m for m in zoo.default_methods if m not in ("maml", "llama")
           or model != "eight_schools"]
    for method in ran:
        assert f"| {method} |" in report
    if zoo.compare_report is not None:  # networks: held-out predictive, no globals table
        assert "theta[" not in report and not list(tmp_path.glob("*.nc"))
        return
    assert "Against NUTS" in report and "R-hat" in report
    for method in ("laplace", "nuts"):
        idata = az.from_netcdf(tmp_path / f"{method}.nc")
        assert "tasks" in idata.posterior.dims
    assert next(tmp_path.glob("forest_*.png")).stat().st_size > 10_000
    if "maml" in ran:
        # τ is not in MAML's objective: reported as not estimated, never scored
        assert "tau not estimated" in report and "NaN: not estimated" in out
        maml = az.from_netcdf(tmp_path / "maml.nc") if (tmp_path / "maml.nc").exists() else None
        if maml is not None:
            assert maml.posterior.attrs["inactive_sites"] == "tau"
            assert np.isnan(maml.posterior["tau"].values).all()
    if model == "eight_schools":
        assert "tau at the boundary 0" in report
    if model == "logistic":
        assert "Laplace is approximate" in report
    if model == "linear":
        _laplace_equals_exact_eb(report)
        # 2-D tasks: the implicit-prior ellipses, unless MAML's task posterior was not
        # formed (β·λ ≥ 1 at the fitted σ), which the report then says
        figure = tmp_path / "implicit_prior.png"
        assert figure.exists() != ("task posterior not formed" in report)
        assert not figure.exists() or figure.stat().st_size > 10_000


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

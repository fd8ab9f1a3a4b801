"""The ``hbmeta`` command line end to end."""

import subprocess
import sys

import numpy as np
import pytest

from numpyro_hbmeta.cli import main


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    assert "linear" in capsys.readouterr().out


def test_compare_linear_small_writes_report(tmp_path, capsys):
    assert main(["compare", "linear", "--small", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    for text in (out, report):
        assert "exact EB" in text and "theta[1]" in text and "nuts (mean ± sd)" in text
    assert "not in objective" in report  # τ is not identified by MAML's objective
    assert (tmp_path / "implicit_prior.png").stat().st_size > 10_000  # 2-D tasks: ellipses
    assert {p.name for p in tmp_path.glob("*.nc")} == {"maml.nc", "laplace.nc", "nuts.nc"}
    # Laplace EB is exact type-II ML here: its column equals the exact one to print precision.
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| theta")]
    header = next(line.split("|") for line in report.splitlines() if line.startswith("| site"))
    exact_col = [c.strip() for c in header].index("exact EB")
    laplace_col = [c.strip() for c in header].index("laplace")
    for row in rows:
        assert abs(float(row[exact_col]) - float(row[laplace_col])) <= 0.002


def test_unknown_model_and_method_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        main(["compare", "nope", "--out", str(tmp_path)])
    assert main(["compare", "linear", "--methods", "magic", "--out", str(tmp_path)]) == 2


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "numpyro_hbmeta.cli", "models"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert "linear" in result.stdout


@pytest.mark.parametrize("model", ["logistic", "eight_schools", "radon"])
def test_compare_every_zoo_model_small(tmp_path, model, capsys):
    """End to end with --small: report, one netCDF per method, the forest figure."""
    import arviz as az

    assert main(["compare", model, "--small", "--no-progress", "--methods", "laplace,nuts",
                 "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Against NUTS" in report and "R-hat" in report
    for method in ("laplace", "nuts"):
        idata = az.from_netcdf(tmp_path / f"{method}.nc")
        assert "tasks" in idata.posterior.dims
    figure = next(tmp_path.glob("forest_*.png"))
    assert figure.stat().st_size > 10_000
    if model == "eight_schools":
        assert "tau at the boundary 0" in report
    if model == "logistic":
        assert "Laplace is approximate" in report


@pytest.mark.slow
def test_compare_sinusoid_small_reports_heldout_predictives(tmp_path, capsys):
    """The sinusoid's 1761 globals are not tabulated: held-out predictive metrics are, for
    the methods that make sense (maml, llama); the others are refused clearly."""
    assert main(["compare", "sinusoid", "--methods", "maml,nuts", "--out", str(tmp_path)]) == 2
    assert "not ['nuts']" in capsys.readouterr().err
    assert main(["compare", "sinusoid", "--small", "--no-progress", "--methods", "maml,llama",
                 "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Held-out predictive" in report and "theta[" not in report
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:-1]
            for line in report.splitlines()
            if line.startswith(("| maml", "| llama")) and line.count("|") == 8}  # 7 columns
    assert set(rows) == {("maml", "plug-in at φ̂ (no adaptation)"), ("maml", "plug-in at φ̂"),
                         ("llama", "linearised Laplace, K-FAC")}
    for cells in rows.values():
        assert all(np.isfinite(float(c)) for c in cells)
    adapted, unadapted = (float(rows["maml", k][0]) for k in
                          ("plug-in at φ̂", "plug-in at φ̂ (no adaptation)"))
    assert adapted < unadapted  # the inner loop helps on new tasks
    assert float(rows["llama", "linearised Laplace, K-FAC"][4]) > 0.5  # sd beyond σ
    assert (tmp_path / "functions.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.nc"))  # no task draws of 1761 weights to export

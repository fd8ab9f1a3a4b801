"""Smoke run of experiments/sinusoid.py at a tiny size: outputs exist, numbers are consistent."""

import math

import numpy as np
import pytest


def table(report: str, title: str) -> list[dict[str, str]]:
    """The markdown table after the heading ``title``, as one dict per row."""
    lines = report.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


@pytest.mark.slow
def test_tiny_run_writes_a_consistent_report(tmp_path, experiment_script):
    experiment = experiment_script("sinusoid")
    experiment.main(["--out", str(tmp_path), "--shots", "5", "--methods", "maml,llama-kfac",
                     "--train-tasks", "10", "--meta-steps", "2", "--test-tasks", "3",
                     "--query-points", "4", "--nuts-tasks", "2", "--nuts-warmup", "10",
                     "--nuts-samples", "10", "--grid", "15", "--draws", "5"])
    report = (tmp_path / "report.md").read_text()
    for figure in ("functions.png", "predictive_sd.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
        assert f"]({figure})" in report
    heldout = table(report, "## Held-out tasks")
    assert [r["method"] for r in heldout] == ["maml (no adaptation)", "maml", "llama-kfac"]
    numbers = ["query MSE", "log-lik / point", "90% coverage of y", "90% coverage of f",
               "mean predictive sd"]
    for row in heldout:
        assert all(math.isfinite(float(row[k])) for k in numbers), row
        assert 0 <= float(row["90% coverage of y"]) <= 1
    by_method = {r["method"]: r for r in heldout}
    # A point prediction has the noise sd and no band of f; the Laplace adds posterior spread.
    assert float(by_method["maml"]["mean predictive sd"]) == pytest.approx(0.5, abs=1e-3)
    assert float(by_method["maml"]["90% coverage of f"]) == 0.0
    assert float(by_method["llama-kfac"]["mean predictive sd"]) > 0.5
    # The table's MSE is recomputed from the saved query-point predictions.
    saved = np.load(tmp_path / "predictions.npz")
    for method in ("maml", "llama-kfac"):
        mse = np.mean((saved[f"5/{method}/mean"] - saved["5/f_true"]) ** 2)
        assert float(by_method[method]["query MSE"]) == pytest.approx(mse, abs=6e-4)
        assert saved[f"5/{method}/mean"].shape == (3, 4)
    nuts = table(report, "## Against NUTS")
    assert [r["method"] for r in nuts] == ["maml", "llama-kfac", "NUTS (exact)"]
    for row in nuts:
        assert all(math.isfinite(float(row[k])) for k in numbers), row
    mse = np.mean((saved["5/nuts/mean"] - saved["5/f_true"][:2]) ** 2)
    assert float(nuts[-1]["query MSE"]) == pytest.approx(mse, abs=6e-4)
    assert "divergences" in nuts[-1]["NUTS diagnostics"]


def test_arguments_are_checked(experiment_script):
    experiment = experiment_script("sinusoid")
    args = experiment.parse_args(["--shots", "5,10"])
    assert args.shots == [5, 10] and args.train_tasks == experiment.SMALL["train_tasks"]
    assert experiment.parse_args(["--full"]).meta_steps == experiment.FULL["meta_steps"]
    with pytest.raises(SystemExit):
        experiment.parse_args(["--methods", "maml,svi"])
    with pytest.raises(SystemExit):
        experiment.parse_args(["--test-tasks", "2", "--nuts-tasks", "3"])

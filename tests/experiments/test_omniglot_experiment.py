"""Smoke run of experiments/omniglot.py at a tiny size on synthetic images."""

import json

import numpy as np
import pytest


@pytest.mark.slow  # two meta-training compiles (MAML, LLAMA): ~70 s on a loaded 2-core CPU
def test_tiny_synthetic_run_writes_an_honest_report(tmp_path, monkeypatch, experiment_script):
    monkeypatch.delenv("HBMETA_OMNIGLOT", raising=False)
    experiment = experiment_script("omniglot")
    out = tmp_path / "omniglot"
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        results = experiment.main(["--small", "--meta-steps", "4", "--test-episodes", "12",
                                   "--tasks-per-batch", "2", "--eval-every", "2", "--hidden", "16",
                                   "--no-progress", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert report.startswith("**SYNTHETIC DATA")
    assert "98.7 ± 0.4" in report and "Finn et al. 2017" in report
    assert "LLAMA (K-FAC) / MAML cost per meta-iteration" in report
    for name in ("curves.png", "accuracy.png", "results.json"):
        assert (out / name).stat().st_size > 0
    stored = json.loads((out / "results.json").read_text())
    assert stored["synthetic"] is True and set(stored["methods"]) == {"maml", "llama"}
    for method in results["methods"].values():
        per_episode = np.asarray(method["per_episode"])
        assert per_episode.shape == (12,)
        assert np.all((per_episode >= 0) & (per_episode <= 1))
        assert method["accuracy"] == pytest.approx(per_episode.mean())
        low = method["accuracy"] - method["interval"]
        high = method["accuracy"] + method["interval"]
        assert method["interval"] > 0 and low <= per_episode.mean() <= high
        assert len(method["losses"]) == 4 and method["eval_steps"] == [0, 2, 4]
        assert 0 <= method["calibration"]["ece"] <= 1


def test_calibration_of_a_perfectly_calibrated_predictor_is_zero(experiment_script):
    experiment = experiment_script("omniglot")
    # confidence 0.8 on 10 points, 8 of them right: ECE 0; entropy of (0.8, 0.2)
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    result = experiment.calibration(probs, labels)
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["entropy"] == pytest.approx(-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)))
    assert result["curve"] == [(pytest.approx(0.8), pytest.approx(0.8), 10)]

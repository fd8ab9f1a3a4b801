"""The code on the getting-started page runs as printed."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def run_block(block: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # a snippet may write files (fit.npz)
    script = tmp_path / "snippet.py"
    script.write_text(block)
    return runpy.run_path(str(script), run_name="__main__")


def test_the_page_has_the_first_model_and_the_step_by_step_blocks():
    assert len(python_blocks()) == 2, f"expected two python blocks on {PAGE.name}"


def test_first_model_on_the_getting_started_page_runs(tmp_path, monkeypatch):
    namespace = run_block(python_blocks()[0], tmp_path, monkeypatch)
    theta = np.asarray(namespace["fit"].params["theta"])
    assert theta.shape == (2,) and np.all(np.isfinite(theta))
    # MAML's loss must have gone down: the page claims the fit does something.
    losses = np.asarray(namespace["fit"].losses)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_fitting_step_by_step_runs_as_printed(tmp_path, monkeypatch):
    namespace = run_block(python_blocks()[1], tmp_path, monkeypatch)
    fit, streamed = namespace["fit"], namespace["streamed"]
    assert (tmp_path / "fit.npz").exists()
    assert np.all(np.isfinite(np.asarray(fit.params["theta"])))
    assert int(fit.state.step) == 1000 and int(streamed.state.step) == 200

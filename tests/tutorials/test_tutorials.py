"""Every tutorial runs end to end in small mode and writes its figures.

A tutorial checks its own key numbers with ``assert`` (each with a tolerance stated in its
prose), so a tutorial whose numbers drift exits non-zero and fails here. Each one runs in its
own interpreter, as a reader would run ``python tutorials/NN_name.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
EXPECTED = (
    "01_maml_is_empirical_bayes",
    "02_laplace_and_llama",
    "03_checking_against_mcmc",
    "04_diagnostics_with_arviz",
    "05_few_shot_omniglot",
)
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def test_every_expected_tutorial_exists():
    assert sorted(p.stem for p in SCRIPTS) == sorted(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_tutorial_is_a_jupytext_notebook_with_its_closing_sections(script):
    text = script.read_text()
    assert text.startswith("# ---\n") and "format_name: percent" in text, script.name
    assert re.search(r"^# %% \[markdown\]", text, flags=re.M), script.name
    for heading in ("What we learned", "Where the approximation fails"):
        assert re.search(rf"^# #+ {heading}", text, flags=re.M), f"{script.name}: {heading}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_tutorial_runs_in_small_mode_and_writes_figures(script, tmp_path):
    env = {**os.environ, "HBMETA_TUTORIAL_SMALL": "1", "HBMETA_TUTORIAL_OUT": str(tmp_path),
           "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (
        f"{script.name} exited {run.returncode}\n--- stdout (tail) ---\n{run.stdout[-4000:]}"
        f"\n--- stderr (tail) ---\n{run.stderr[-6000:]}")
    figures = sorted((tmp_path / script.stem).glob("*.png"))
    assert figures, f"{script.name} wrote no figure under {tmp_path / script.stem}"
    assert all(f.stat().st_size > 5_000 for f in figures), [f.name for f in figures]

"""Running a tutorial as a reader would: ``python tutorials/NN_name.py`` in small mode.

A tutorial checks its own key numbers with ``assert`` (each with a tolerance stated in its
prose), so a tutorial whose numbers drift exits non-zero and fails its test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"

# Which test file runs which tutorial (two files, so that two xdist workers share the runs).
RUN_BY = {
    "test_statistics_tutorials.py": ("01_maml_is_empirical_bayes", "03_checking_against_mcmc",
                                     "04_diagnostics_with_arviz"),
    "test_neural_tutorials.py": ("02_laplace_and_llama", "05_few_shot_omniglot"),
}


def run_tutorial(stem: str, tmp_path: Path) -> None:
    """Run ``tutorials/<stem>.py`` in small mode in its own interpreter; it must exit 0 and
    write at least one non-trivial figure under ``tmp_path/<stem>``."""
    script = TUTORIALS / f"{stem}.py"
    env = {**os.environ, "HBMETA_TUTORIAL_SMALL": "1", "HBMETA_TUTORIAL_OUT": str(tmp_path),
           "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (
        f"{script.name} exited {run.returncode}\n--- stdout (tail) ---\n{run.stdout[-4000:]}"
        f"\n--- stderr (tail) ---\n{run.stderr[-6000:]}")
    figures = sorted((tmp_path / stem).glob("*.png"))
    assert figures, f"{script.name} wrote no figure under {tmp_path / stem}"
    assert all(f.stat().st_size > 5_000 for f in figures), [f.name for f in figures]

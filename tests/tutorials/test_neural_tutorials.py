"""The neural tutorials (02 Laplace and LLAMA, 05 few-shot Omniglot) run end to end in
small mode and write their figures."""

import pytest
from tutorial_runner import RUN_BY, run_tutorial


@pytest.mark.slow  # a whole tutorial: minutes of fits
@pytest.mark.parametrize("stem", RUN_BY["test_neural_tutorials.py"])
def test_tutorial_runs_in_small_mode_and_writes_figures(stem, tmp_path):
    run_tutorial(stem, tmp_path)

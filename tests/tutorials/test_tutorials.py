"""The tutorials' shape: all five exist, each a jupytext notebook with its closing sections.

They are run end to end (small mode) by ``test_statistics_tutorials.py`` (01, 03, 04) and
``test_neural_tutorials.py`` (02, 05): two files so that pytest-xdist's two workers share the
~8 minutes of runs; ``test_every_tutorial_is_run`` keeps the split complete.
"""

from __future__ import annotations

import re

import pytest
from tutorial_runner import RUN_BY, TUTORIALS

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


def test_every_tutorial_is_run():
    assert sorted(stem for stems in RUN_BY.values() for stem in stems) == sorted(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_tutorial_is_a_jupytext_notebook_with_its_closing_sections(script):
    text = script.read_text()
    assert text.startswith("# ---\n") and "format_name: percent" in text, script.name
    assert re.search(r"^# %% \[markdown\]", text, flags=re.M), script.name
    for heading in ("What we learned", "Where the approximation fails"):
        assert re.search(rf"^# #+ {heading}", text, flags=re.M), f"{script.name}: {heading}"

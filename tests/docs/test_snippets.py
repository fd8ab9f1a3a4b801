"""The code on the getting-started page runs as printed."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"


def test_first_model_on_the_getting_started_page_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 1, f"expected one python block on {PAGE.name}, found {len(blocks)}"
    script = tmp_path / "first_model.py"
    script.write_text(blocks[0])
    namespace = runpy.run_path(str(script), run_name="__main__")
    theta = np.asarray(namespace["fit"].params["theta"])
    assert theta.shape == (2,) and np.all(np.isfinite(theta))
    # MAML's loss must have gone down: the page claims the fit does something.
    losses = np.asarray(namespace["fit"].losses)
    assert losses[-1] < losses[0]

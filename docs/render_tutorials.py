"""Execute the tutorials into the notebooks the documentation site shows.

    python docs/render_tutorials.py            # full mode, every tutorial (minutes each)
    python docs/render_tutorials.py 01 03      # those whose names start with 01 or 03
    python docs/render_tutorials.py --small    # small mode (what the tests run)
    python docs/render_tutorials.py --check    # no execution: are the notebooks up to date?

Each ``tutorials/NN_name.py`` (jupytext percent format) is read with jupytext, executed with
nbclient in a fresh kernel, and written to ``docs/tutorials/NN_name.ipynb`` with its outputs.
Figures a tutorial saves go to ``docs/figures/NN_name/``. ``--check`` compares the code and
markdown of every notebook with its script and exits 1 naming those that differ, so a site
built from stale notebooks fails CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "tutorials"
NOTEBOOKS = ROOT / "docs" / "tutorials"
FIGURES = ROOT / "docs" / "figures"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def stale(script: Path) -> str | None:
    """Why the rendered notebook of ``script`` is out of date, or None when it is current."""
    target = NOTEBOOKS / f"{script.stem}.ipynb"
    if not target.exists():
        return f"{target.relative_to(ROOT)} is missing"
    if _cells(jupytext.read(script)) != _cells(nbformat.read(target, as_version=4)):
        return f"{target.relative_to(ROOT)} differs from {script.relative_to(ROOT)}"
    return None


def render(script: Path, *, small: bool, timeout: int) -> float:
    """Execute ``script`` as a notebook; write it with its outputs; return the seconds taken."""
    notebook = jupytext.read(script)
    notebook.metadata.pop("jupytext", None)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    figures = FIGURES / script.stem
    figures.mkdir(parents=True, exist_ok=True)
    os.environ["HBMETA_TUTORIAL_OUT"] = str(FIGURES)
    os.environ["HBMETA_TUTORIAL_SMALL"] = "1" if small else "0"
    # Inline figures in the notebook, whatever backend the calling shell set (CI sets Agg).
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    start = time.perf_counter()
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    seconds = time.perf_counter() - start
    NOTEBOOKS.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, NOTEBOOKS / f"{script.stem}.ipynb")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="tutorial name prefixes (default: all)")
    parser.add_argument("--small", action="store_true", help="small mode (HBMETA_TUTORIAL_SMALL=1)")
    parser.add_argument("--check", action="store_true", help="only check the notebooks are current")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    scripts = [s for s in sorted(SOURCES.glob("[0-9][0-9]_*.py"))
               if not args.prefixes or any(s.stem.startswith(p) for p in args.prefixes)]
    if not scripts:
        print(f"no tutorial matches {args.prefixes}", file=sys.stderr)
        return 2
    if args.check:
        problems = [why for why in map(stale, scripts) if why]
        for why in problems:
            print(f"stale: {why}; run `python docs/render_tutorials.py`", file=sys.stderr)
        return 1 if problems else 0
    for script in scripts:
        seconds = render(script, small=args.small, timeout=args.timeout)
        print(f"{script.stem}: {seconds:.0f} s ({'small' if args.small else 'full'} mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

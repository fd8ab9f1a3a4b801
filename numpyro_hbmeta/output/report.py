"""The comparison table of ``hbmeta compare``: global estimates of each method side by side
with the simulation's truth and, where the zoo model has one, the exact empirical-Bayes answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from numpyro_hbmeta.infer.results import FitResult

__all__ = ["global_table", "markdown_table"]


def _elements(name: str, value: np.ndarray) -> list[tuple[str, tuple[int, ...]]]:
    shape = np.shape(value)
    if not shape:
        return [(name, ())]
    return [(f"{name}[{','.join(map(str, idx))}]", idx) for idx in np.ndindex(*shape)]


def global_table(results: Sequence[FitResult], sites: Sequence[str], *,
                 truth: Mapping[str, Any] | None = None,
                 exact: Mapping[str, Any] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per scalar element of every global site in ``sites``.

    Point estimates print as a number, draws as mean ± sd over chains and draws.
    """
    header = ["site"]
    if truth is not None:
        header.append("truth")
    if exact is not None:
        header.append("exact EB")
    header += [r.method + ("" if set(sites) <= set(r.point_sites) else " (mean ± sd)")
               for r in results]
    rows = []
    for site in sites:
        site_shape = np.shape(results[0].samples[site])[2:]
        for label, idx in _elements(site, np.zeros(site_shape)):
            row = [label]
            if truth is not None:
                row.append(_fmt(truth, site, idx))
            if exact is not None:
                row.append(_fmt(exact, site, idx))
            for r in results:
                row.append(_cell(r, site, idx))
            rows.append(row)
    return header, rows


def _fmt(values: Mapping[str, Any], site: str, idx: tuple[int, ...]) -> str:
    if site not in values:
        return "—"
    return f"{float(np.asarray(values[site])[idx]):.3f}"


def _cell(result: FitResult, site: str, idx: tuple[int, ...]) -> str:
    if site in result.info.get("inactive_sites", ()):
        return "— (not in objective)"
    if site not in result.samples:
        return "—"
    draws = np.asarray(result.samples[site])[(slice(None), slice(None), *idx)]
    if site in result.point_sites:
        return f"{float(draws.flat[0]):.3f}"
    return f"{draws.mean():.3f} ± {draws.std():.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])

"""The comparison table of ``hbmeta compare``: global estimates of each method side by side
with the simulation's truth and, where the zoo model has one, the exact empirical-Bayes answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from numpyro_hbmeta.methods import MethodResult

__all__ = ["global_table", "markdown_table"]


def _elements(name: str, value: np.ndarray) -> list[tuple[str, tuple[int, ...]]]:
    shape = np.shape(value)
    if not shape:
        return [(name, ())]
    return [(f"{name}[{','.join(map(str, idx))}]", idx) for idx in np.ndindex(*shape)]


def global_table(results: Sequence[MethodResult], *, truth: Mapping[str, Any] | None = None,
                 exact: Mapping[str, Any] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per scalar element of every global site."""
    header = ["site"]
    if truth is not None:
        header.append("truth")
    if exact is not None:
        header.append("exact EB")
    header += [r.method + ("" if r.point else " (mean ± sd)") for r in results]
    sites = list(results[0].globals_)
    rows = []
    for site in sites:
        template = results[0].globals_[site]
        site_shape = np.shape(template) if results[0].point else np.shape(template)[1:]
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


def _cell(result: MethodResult, site: str, idx: tuple[int, ...]) -> str:
    if site in result.inactive_sites:
        return "— (not in objective)"
    if site not in result.globals_:
        return "—"
    value = np.asarray(result.globals_[site])
    if result.point:
        return f"{float(value[idx]):.3f}"
    draws = value[(slice(None), *idx)]
    return f"{draws.mean():.3f} ± {draws.std():.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])

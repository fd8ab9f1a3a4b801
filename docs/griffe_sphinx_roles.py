"""A griffe extension: show the docstrings' Sphinx roles as code on the documentation site.

The package's docstrings cross-reference with Sphinx roles (``:class:`~pkg.Name```), which
read well in ``help()`` and editors; mkdocstrings renders Markdown, where a role would print
verbatim. ``~pkg.Name`` becomes ``Name``, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")


def _as_code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as Markdown code spans."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_as_code, obj.docstring.value)

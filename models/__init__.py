"""The model zoo: small, documented hierarchical models with the data they ship or simulate.

Each module has ``model`` (an ordinary NumPyro model with a ``tasks`` plate), ``load_data(
rng_key=None, *, small=False)`` returning a :class:`numpyro_hbmeta.data.TaskData`, a one-line
``SUMMARY``, the names of its ``GLOBALS`` and ``TASK_SITES``, and ``LAPLACE_EXACT`` (whether
the Laplace evidence is exact for it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

ZOO: tuple[str, ...] = ("linear", "logistic", "eight_schools", "radon", "sinusoid", "fewshot")


def get_model(name: str) -> ModuleType:
    """The zoo module called ``name``."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    return importlib.import_module(f"{__name__}.{name}")


def available() -> dict[str, str]:
    """Model name -> one-line summary."""
    return {name: get_model(name).SUMMARY for name in ZOO}

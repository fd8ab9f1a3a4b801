"""The model zoo: small, documented hierarchical models with the data they ship or simulate.

Each module declares ``ZOO_MODEL``, a :class:`numpyro_hbmeta.zoo.ZooModel` (name, summary,
model, ``load_data``, globals, task sites, whether Laplace is exact, default and supported
``hbmeta compare`` methods, typed fit settings and optional hooks), and keeps the module
attributes it points at: ``model``, ``load_data(rng_key=None, *, small=False)`` returning a
:class:`numpyro_hbmeta.data.TaskData`, ``SUMMARY``, ``GLOBALS``, ``TASK_SITES``,
``LAPLACE_EXACT``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from numpyro_hbmeta.zoo import FitSettings, ZooModel

__all__ = ["ZOO", "FitSettings", "ZooModel", "available", "get_model", "get_zoo_model"]

ZOO: tuple[str, ...] = ("linear", "logistic", "eight_schools", "radon", "sinusoid", "fewshot")


def get_model(name: str) -> ModuleType:
    """The zoo module called ``name`` (``get_model("linear").model``)."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    return importlib.import_module(f"{__name__}.{name}")


def get_zoo_model(name: str) -> ZooModel:
    """The typed zoo entry of model ``name``: ``get_model(name).ZOO_MODEL``."""
    zoo_model = get_model(name).ZOO_MODEL
    if not isinstance(zoo_model, ZooModel) or zoo_model.name != name:
        raise TypeError(f"models/{name}.py: ZOO_MODEL must be a ZooModel named {name!r}, got "
                        f"{zoo_model!r}")
    return zoo_model


def available() -> dict[str, str]:
    """Model name -> one-line summary."""
    return {name: get_zoo_model(name).summary for name in ZOO}

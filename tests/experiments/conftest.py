"""Experiment scripts are not a package: tests load them from their files."""

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture
def experiment_script():
    """name -> the module ``experiments/<name>.py``, freshly loaded."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_experiment",
                                                      EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

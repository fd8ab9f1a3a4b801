"""Every public name stays importable from ``numpyro_hbmeta`` (DESIGN: a renamed public name
keeps its old name as an alias)."""

import importlib

import pytest

import numpyro_hbmeta as hbm

# The package's ``__all__`` before the driver was split into pure steps (commit ae9c292).
BEFORE = ("GGN", "KFAC", "FitResult", "InnerInfo", "MetaEB", "MetaEBResult", "MetaMarginal",
          "Newton", "TaskData", "TruncatedGD", "baselines", "compare", "conv2d_layer",
          "dense_layer", "implicit_prior", "meta_marginal", "models", "plots", "tasks",
          "to_inference_data")
ADDED = ("MetaEBState", "StepInfo", "TaskPosterior")


@pytest.mark.parametrize("name", BEFORE + ADDED)
def test_public_name_imports(name):
    assert getattr(hbm, name) is not None
    assert name in hbm.__all__


def test_module_level_names_used_by_tutorials_and_experiments_still_import():
    # Names reached through their modules in the tutorials, experiments and docs.
    for module, names in {
        "numpyro_hbmeta.infer.eb": ("MetaEB", "MetaEBResult", "TaskGaussian"),
        "numpyro_hbmeta.marginal.meta_marginal": ("OBJECTIVE_SITE", "TaskContext", "meta_marginal"),
        "numpyro_hbmeta.infer.implicit_prior": ("context_at", "implicit_prior"),
        "numpyro_hbmeta.inner": ("InnerInfo", "Newton", "TruncatedGD"),
    }.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name), f"{module}.{name}"

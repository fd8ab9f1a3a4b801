"""The typed zoo protocol: every model declares a well-formed ZooModel; the data-chosen
MAML step keeps β·λ < 1 for every task at the start."""

import dataclasses

import jax
import numpy as np
import pytest

from numpyro_hbmeta import models
from numpyro_hbmeta.infer.methods import METHODS, stable_step_size, support_max_eigenvalues
from numpyro_hbmeta.zoo import SMALL_CAPS, FitSettings, ZooModel


@pytest.mark.parametrize("name", models.ZOO)
def test_every_model_declares_a_zoo_model(name):
    module = models.get_model(name)
    zoo = models.get_zoo_model(name)
    assert isinstance(zoo, ZooModel) and zoo.name == name
    assert zoo.model is module.model and zoo.load_data is module.load_data
    assert zoo.summary == module.SUMMARY and zoo.globals == module.GLOBALS
    assert zoo.task_sites == module.TASK_SITES and zoo.laplace_exact == module.LAPLACE_EXACT
    assert set(zoo.default_methods) <= set(METHODS)
    assert all(zoo.supports(m) for m in zoo.default_methods)
    small = zoo.settings(small=True)
    for field, cap in SMALL_CAPS.items():
        assert getattr(small, field) <= cap


def test_zoo_model_and_settings_are_checked():
    linear = models.get_zoo_model("linear")
    with pytest.raises(ValueError, match="not among its compare_methods"):
        dataclasses.replace(linear, compare_methods=("laplace",))
    with pytest.raises(ValueError, match="default_methods must be a non-empty tuple"):
        dataclasses.replace(linear, default_methods=())
    with pytest.raises(ValueError, match=r"maml_step_fraction must be in \(0, 1\)"):
        FitSettings(maml_step_fraction=1.0)
    with pytest.raises(ValueError, match="counts must be positive integers"):
        FitSettings(eb_steps=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        linear.name = "other"


@pytest.mark.parametrize("name", ["linear", "radon"])
def test_stable_step_size_on_linear_gaussian_tasks(name):
    """For Gaussian tasks the support NLL Hessian is the closed form X_jᵀX_j / σ²; the rule
    β = c / max_j λ_max,j gives β·λ_max,j ≤ c < 1 with equality for the stiffest task."""
    zoo = models.get_zoo_model(name)
    data = zoo.load_data(jax.random.PRNGKey(0), small=True)
    params = {"theta": np.array([0.3, -0.2]), "mu_alpha": 1.0, "beta": -0.5, "tau": 0.7,
              "sigma": 0.6}
    params = {k: np.asarray(v, np.float32) for k, v in params.items() if k in zoo.globals}
    largest = support_max_eigenvalues(zoo.model, params, data.support)
    if name == "linear":
        x = np.asarray(data.support["x"], float)
        gram = np.einsum("jnf,jng->jfg", x, x) / 0.6**2
    else:  # one intercept per county: n_j real houses
        gram = np.asarray(data.support["mask"]).sum(-1)[:, None, None] / 0.6**2
    np.testing.assert_allclose(largest, np.linalg.eigvalsh(gram)[:, -1], rtol=1e-4)
    beta = stable_step_size(zoo.model, params, data.support, fraction=0.5)
    assert np.max(beta * largest) == pytest.approx(0.5, rel=1e-6)

"""Shared fixtures. Exactness tests run in float64 through the ``x64`` fixture."""

import jax
import pytest


@pytest.fixture
def x64():
    """Compute in float64 for the duration of a test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def linear_data(x64):
    from numpyro_hbmeta.models import linear

    return linear.simulate(jax.random.PRNGKey(0), num_tasks=6, num_support=7, num_query=5)

"""Small task dimension (issue 12.4): unrolled factorisations, the IFT tangent solve by
Cholesky with its LU fallback, and the Laplace evidence and its gradient on the linear model
equal to the closed form in float64."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.inner.newton import _hessian_solve
from numpyro_hbmeta.models import linear

# The module (the package attribute ``numpyro_hbmeta.curvature.full`` is the builder function).
full_module = importlib.import_module("numpyro_hbmeta.curvature.full")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _spd(rng, batch, d):
    a = rng.standard_normal((batch, d, d))
    return a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(d)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_unrolled_factorisations_are_lapacks(x64, d):
    rng = np.random.default_rng(d)
    m = _spd(rng, 7, d)
    lower = full_module.cholesky(jnp.asarray(m))
    np.testing.assert_allclose(lower, np.linalg.cholesky(m), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(full_module.triangular_inverse(lower),
                               np.linalg.inv(np.linalg.cholesky(m)), rtol=1e-10, atol=1e-12)
    rhs = rng.standard_normal((7, d))
    np.testing.assert_allclose(full_module.cholesky_solve(jnp.asarray(m), jnp.asarray(rhs)),
                               np.linalg.solve(m, rhs[..., None])[..., 0], rtol=1e-10)
    # log det and its gradient (through the unrolled recurrence) against slogdet's.
    curv = full_module.FullCurvature(jnp.asarray(m))
    np.testing.assert_allclose(curv.logdet(), np.linalg.slogdet(m)[1], rtol=1e-12)
    ours = jax.grad(lambda x: jnp.sum(full_module.FullCurvature(x).logdet()))(jnp.asarray(m))
    ref = jax.grad(lambda x: jnp.sum(jnp.linalg.slogdet(x)[1]))(jnp.asarray(m))
    np.testing.assert_allclose(0.5 * (ours + np.swapaxes(ours, -1, -2)),
                               0.5 * (ref + np.swapaxes(ref, -1, -2)), rtol=1e-10, atol=1e-12)


def test_unrolled_cholesky_is_nan_where_not_positive_definite(x64):
    m = np.stack([np.eye(3), np.diag([1.0, -1.0, 2.0]), np.diag([1.0, 0.0, 1.0]),
                  np.full((3, 3), np.nan)])
    lower = np.asarray(full_module.cholesky(jnp.asarray(m)))
    np.testing.assert_array_equal(lower[0], np.eye(3))
    assert np.isnan(lower[1:]).all()   # every entry, as jnp.linalg.cholesky
    assert np.isnan(np.asarray(full_module.FullCurvature(jnp.asarray(m)).logdet())[1:]).all()


def test_small_blocks_lower_without_lapack():
    m = jnp.asarray(_spd(np.random.default_rng(0), 1000, 2), jnp.float32)
    text = jax.jit(jax.grad(lambda x: jnp.sum(full_module.FullCurvature(x).logdet()))).lower(
        m).compile().as_text()
    assert "custom_call_target" not in text


def test_tangent_solve_falls_back_to_lu_for_an_indefinite_block(x64):
    rng = np.random.default_rng(3)
    blocks = _spd(rng, 4, 3)
    blocks[2] = np.diag([2.0, -1.0, 3.0]) + 0.1   # indefinite: Cholesky fails, LU does not
    rhs = rng.standard_normal((4, 3))
    expected = np.linalg.solve(blocks, rhs[..., None])[..., 0]
    for b in (blocks, blocks[[0, 1, 3]]):           # with and without a failing block
        r = rhs[: len(b)]
        got = jax.jit(_hessian_solve)(jnp.asarray(b), jnp.asarray(r))
        np.testing.assert_allclose(got, np.linalg.solve(b, r[..., None])[..., 0], rtol=1e-10)
    # Linear in the right-hand side, hence transposable (what custom_root's VJP needs).
    _, vjp = jax.vjp(lambda r: _hessian_solve(jnp.asarray(blocks), r), jnp.asarray(rhs))
    (back,) = vjp(jnp.ones_like(jnp.asarray(rhs)))
    np.testing.assert_allclose(back, np.linalg.solve(np.swapaxes(blocks, -1, -2),
                                                     np.ones((4, 3, 1)))[..., 0], rtol=1e-10)
    assert np.isfinite(expected).all()


def test_laplace_objective_and_gradient_are_the_closed_form_evidence(x64):
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=50, num_support=10)
    support = {k: jnp.asarray(v, jnp.float64) for k, v in data.support.items()}
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")
    params = {"theta": jnp.array([0.5, -0.2]), "tau": jnp.asarray(0.3),
              "sigma": jnp.asarray(-0.4)}

    def exact(p):
        constrained = {"theta": p["theta"], "tau": jnp.exp(p["tau"]),
                       "sigma": jnp.exp(p["sigma"])}
        return -jnp.sum(linear.exact_log_evidence(constrained, support))

    value, grads = jax.jit(jax.value_and_grad(driver.loss))(params, support)
    value_ref, grads_ref = jax.value_and_grad(exact)(params)
    np.testing.assert_allclose(value, value_ref, rtol=1e-10)
    for name in params:
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10)

"""The deadlock-free eigh/Cholesky: same numbers and derivatives as jnp.linalg (float64), and
never a batched LAPACK call on CPU (the property that removes the thread-pool deadlock)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_hbmeta.curvature import _linalg as linalg
from numpyro_hbmeta.curvature import kronecker as kfac


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def random_spd(seed, batch, dim):
    x = np.random.default_rng(seed).normal(size=(*batch, dim, dim + 2))
    return x @ np.swapaxes(x, -1, -2) / dim + 0.1 * np.eye(dim)


# (3,) × 24 and (2, 3) × 24 are big enough to take the loop; () is a single matrix.
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_values_equal_numpy(batch):
    x = random_spd(0, batch, 24)
    w, v = linalg.eigh(x)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(x), rtol=1e-12)
    np.testing.assert_allclose(v @ (w[..., None] * np.swapaxes(v, -1, -2)), x, atol=1e-12)
    np.testing.assert_allclose(np.swapaxes(v, -1, -2) @ v,
                               np.broadcast_to(np.eye(24), x.shape), atol=1e-12)
    np.testing.assert_allclose(linalg.eigvalsh(x), w, rtol=0)
    lower = linalg.cholesky(x)
    np.testing.assert_allclose(lower, np.linalg.cholesky(x), rtol=1e-12)
    np.testing.assert_allclose(linalg.triangular_inverse(lower), np.linalg.inv(lower),
                               rtol=1e-10, atol=1e-12)


def test_vmap_and_nested_vmap_equal_the_batched_call():
    x = random_spd(1, (2, 3), 24)
    np.testing.assert_array_equal(jax.vmap(jax.vmap(linalg.eigvalsh))(x), linalg.eigvalsh(x))
    np.testing.assert_array_equal(jax.vmap(linalg.cholesky)(x), linalg.cholesky(x))


def test_cholesky_of_an_indefinite_matrix_is_nan_as_in_jax():
    x = np.stack([np.eye(3), np.diag([1.0, -1.0, 2.0])])
    lower = linalg.cholesky(x)
    np.testing.assert_array_equal(lower, jnp.linalg.cholesky(x))  # NaN == NaN here
    assert np.isfinite(lower[0]).all() and np.isnan(np.tril(lower[1])[np.tril_indices(3)]).all()


def _objective(eigh, cholesky):
    """A scalar touching eigenvalues, eigenvectors (sign-invariantly) and the Cholesky factor."""
    def f(x):
        w, v = eigh(x)
        lower = cholesky(x)
        return (jnp.sum(jnp.sin(w)) + jnp.sum(v[..., 0] ** 2 * x[..., 0, :])
                + jnp.sum(jnp.log(jnp.diagonal(lower, axis1=-2, axis2=-1)) ** 2)
                + jnp.sum(lower ** 3))
    return f


@pytest.mark.parametrize("batch, dim", [((2,), 3), ((30,), 8)])  # native call; loop
def test_gradient_and_hessian_vector_product_equal_jax(batch, dim):
    x = random_spd(2, batch, dim)
    direction = random_spd(3, batch, dim)
    ours = _objective(linalg.eigh, linalg.cholesky)
    ref = _objective(jnp.linalg.eigh, jnp.linalg.cholesky)
    # Only the symmetric part of x is used, as jnp.linalg's default symmetrize_input does.
    expected = jax.jit(jax.grad(ref))(x)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), expected, rtol=1e-10, atol=1e-12)
    batched = jax.jit(jax.grad(lambda y: jnp.sum(jax.vmap(ours)(y))))
    np.testing.assert_allclose(batched(x), expected, rtol=1e-10, atol=1e-12)

    # Forward over reverse (EB's curvature in θ differentiates a Laplace log det twice).
    def hvp(f):
        return jax.jit(lambda y, v: jax.jvp(jax.grad(f), (y,), (v,))[1])

    np.testing.assert_allclose(hvp(ours)(x, direction), hvp(ref)(x, direction),
                               rtol=1e-8, atol=1e-10)


def test_triangular_inverse_derivative():
    lower = np.linalg.cholesky(random_spd(3, (), 4))
    direction = np.tril(np.random.default_rng(4).normal(size=(4, 4)))
    _, ours = jax.jvp(linalg.triangular_inverse, (lower,), (direction,))
    _, ref = jax.jvp(jnp.linalg.inv, (lower,), (direction,))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def _lapack_operand_shapes(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    calls = [line for line in text.splitlines() if re.search(r"custom_call @(lapack|blas)_", line)]
    return [re.search(r"\(tensor<([0-9x]+)x[a-z0-9]+>", line).group(1) for line in calls]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering is what is checked")
def test_no_batched_lapack_call_that_jaxlib_could_split():
    """jaxlib 0.10–0.11 run a large batched LAPACK call's chunks on XLA's intra-op pool and
    block the calling pool thread; concurrent batched calls then deadlock (module docstring).
    Every LAPACK call on a batch big enough to be split — K-FAC's log det with its gradient
    under vmap over tasks included — must be on one matrix (a rank-2 operand); small batches,
    which jaxlib runs inline, keep the native batched call."""
    x = random_spd(5, (4, 3), 24)  # 12 × 15 · 24³ flops ≥ 2·10⁵: would be split
    shapes = _lapack_operand_shapes(
        jax.vmap(jax.grad(lambda y: jnp.sum(_objective(linalg.eigh, linalg.cholesky)(y)))), x)
    assert shapes and all(s == "24x24" for s in shapes), shapes
    # The reason for all this: jnp.linalg's own call is one batched call.
    assert _lapack_operand_shapes(jnp.linalg.eigh, x) == ["4x3x24x24"]

    factor = kfac.KroneckerFactor(random_spd(6, (4,), 30), random_spd(7, (4,), 20))
    shapes = _lapack_operand_shapes(
        jax.grad(lambda a, g: jnp.sum(kfac.logdet(kfac.KroneckerFactor(a, g), 0.1))),
        factor.A, factor.G)
    assert sorted(set(shapes)) == ["20x20", "30x30"], shapes

    small = random_spd(8, (4, 3), 6)  # 12 × 15 · 6³ < 2·10⁵: jaxlib runs it inline
    assert _lapack_operand_shapes(jax.vmap(linalg.eigh), small) == ["4x3x6x6"]

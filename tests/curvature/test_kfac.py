"""K-FAC blocks against dense linear algebra, in float64 (exact identities)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_hbmeta import curvature, nn
from numpyro_hbmeta.curvature import kronecker as kfac
from numpyro_hbmeta.nn import vec

SIZES_AND_BATCHES = [(1, 1, ()), (4, 3, (3,)), (2, 7, (2, 2))]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def random_psd(seed, batch, dim, rank=None):
    rank = dim + 2 if rank is None else rank
    x = np.random.default_rng(seed).normal(size=(*batch, dim, rank))
    return x @ np.swapaxes(x, -1, -2) / rank


def random_factor(seed, p, q, batch, rank_a=None):
    return kfac.KroneckerFactor(random_psd(seed, batch, p, rank_a),
                                random_psd(seed + 1000, batch, q))


def normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def dense_kron(factor, damping):
    """np.kron per task, independent of kfac.to_dense (numpy, float64)."""
    A, G = np.asarray(factor.A), np.asarray(factor.G)
    batch = A.shape[:-2]
    A, G = A.reshape((-1, *A.shape[-2:])), G.reshape((-1, *G.shape[-2:]))
    blocks = [np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
              for a, g in zip(A, G, strict=True)]
    return np.stack(blocks).reshape((*batch, *blocks[0].shape))


def numpy_mlp(seed, sizes):
    rng = np.random.default_rng(seed)
    return {f"dense_{i}": {"w": rng.normal(size=(sizes[i], sizes[i + 1])) / np.sqrt(sizes[i]),
                           "b": rng.normal(size=(sizes[i + 1],)) * 0.1}
            for i in range(len(sizes) - 1)}


@jax.jit
def inverse_sqrt_map(factor, damping):
    """The sampler's linear map L (columns L e_k), shape (..., pq, pq)."""
    d = factor.A.shape[-1] * factor.G.shape[-1]
    batch = factor.A.shape[:-2]
    basis = jnp.eye(d).reshape((d, *(1,) * len(batch), d))
    columns = kfac.inverse_sqrt_matvec(factor, basis, damping)  # (d, ..., d): [k] = L e_k
    return jnp.moveaxis(columns, 0, -1)


DAMPINGS = (1e-3, 0.3)


@jax.jit
def _kfac_outputs(singular, full_rank, v):
    return {"logdet": jnp.stack([kfac.logdet(singular, d) for d in DAMPINGS]),
            "logdet_undamped": kfac.logdet(full_rank, 0.0),
            "to_dense": kfac.to_dense(singular, 0.3),
            "solve": kfac.solve(singular, v, 0.1),
            "matvec": kfac.matvec(singular, v),
            "sampler_map": inverse_sqrt_map(singular, 0.2)}


@functools.cache
def kfac_outputs(p, q, batch):
    """Inputs and every K-FAC result the shape-parametrized tests check (one compile each)."""
    singular = random_factor(p * 10 + q, p, q, batch, rank_a=max(p - 1, 1))  # A singular
    full_rank = random_factor(p * 10 + q + 1, p, q, batch)
    v = normal(2, (*batch, p * q))
    return singular, full_rank, v, jax.tree.map(np.asarray, _kfac_outputs(singular, full_rank, v))


@pytest.mark.parametrize(("p", "q", "batch"), SIZES_AND_BATCHES)
def test_logdet_matches_dense_slogdet(p, q, batch):
    singular, full_rank, _, out = kfac_outputs(p, q, batch)
    for damping, got in zip(DAMPINGS, out["logdet"], strict=True):
        sign, expected = np.linalg.slogdet(dense_kron(singular, damping))
        assert np.all(sign == 1.0)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    expected = np.linalg.slogdet(dense_kron(full_rank, 0.0))[1]
    np.testing.assert_allclose(out["logdet_undamped"], expected, atol=1e-8)
    # δ = 0: log det(A ⊗ G) = q log det A + p log det G
    factored = q * np.linalg.slogdet(full_rank.A)[1] + p * np.linalg.slogdet(full_rank.G)[1]
    np.testing.assert_allclose(out["logdet_undamped"], factored, atol=1e-8)
    np.testing.assert_allclose(out["to_dense"], dense_kron(singular, 0.3), atol=1e-14)


@pytest.mark.parametrize(("p", "q", "batch"), SIZES_AND_BATCHES)
def test_solve_and_matvec_match_dense(p, q, batch):
    singular, _, v, out = kfac_outputs(p, q, batch)
    expected = np.linalg.solve(dense_kron(singular, 0.1), v[..., None])[..., 0]
    np.testing.assert_allclose(out["solve"], expected, rtol=1e-10, atol=1e-10)
    expected = (dense_kron(singular, 0.0) @ v[..., None])[..., 0]
    np.testing.assert_allclose(out["matvec"], expected, atol=1e-12)


def dense_inverse_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors / np.sqrt(values)[..., None, :]) @ np.swapaxes(vectors, -1, -2)


@pytest.mark.parametrize(("p", "q", "batch"), SIZES_AND_BATCHES)
def test_sampler_map_squares_to_dense_inverse(p, q, batch):
    singular, _, _, out = kfac_outputs(p, q, batch)
    L = out["sampler_map"]
    dense = dense_kron(singular, 0.2)
    np.testing.assert_allclose(L @ np.swapaxes(L, -1, -2), np.linalg.inv(dense), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(L, dense_inverse_sqrt(dense), atol=1e-10)  # the symmetric root


def test_sample_is_the_sampler_map_applied_to_standard_normals():
    factor = random_factor(4, 3, 2, (2,))
    key = jax.random.PRNGKey(4)
    draws = kfac.sample(key, factor, 0.2, num_samples=3)
    z = np.asarray(jax.random.normal(key, (36,))).reshape(3, 2, 6)  # = normal(key, (3, 2, 6))
    assert draws.shape == (3, 2, 6)
    L = dense_inverse_sqrt(dense_kron(factor, 0.2))
    np.testing.assert_allclose(draws, (L @ z[..., None])[..., 0], atol=1e-10)


@pytest.mark.parametrize("num_samples", [0, -1, 1.5])
def test_sample_refuses_a_non_positive_or_fractional_count(num_samples):
    expected = f"num_samples must be a positive integer, got {num_samples}"
    with pytest.raises(ValueError, match=expected):
        kfac.sample(jax.random.PRNGKey(0), random_factor(0, 2, 2, ()), 0.1,
                    num_samples=num_samples)


def test_one_output_dense_layer_gives_exact_fisher():
    """Linear-Gaussian regression, unit noise: g_n = 1 exactly, so A ⊗ G = JᵀJ, J rows = ā_n."""
    n, d_in = 7, 3
    x = normal(7, (n, d_in))
    J = np.concatenate([x, np.ones((n, 1))], axis=1)  # d (x_n W + b) / d vec([W; b])
    factor = curvature.LayerPoints(J[None], np.ones((1, n, 1))).factor()
    np.testing.assert_allclose(factor.G[0], [[n]])  # n·E[g²]: the sum over points
    np.testing.assert_allclose(np.kron(factor.A[0], factor.G[0]), J.T @ J, rtol=1e-12,
                               atol=1e-12)


def test_multi_output_layer_row_major_convention():
    """Λ = I per point, passed as its q columns; J from jacfwd through unvec_dense."""
    n, d_in, d_out = 5, 3, 2
    x = normal(9, (n, d_in))
    layer = numpy_mlp(10, (d_in, d_out))["dense_0"]
    a_bar = np.concatenate([x, np.ones((n, 1))], axis=1)

    @jax.jit
    def compute(layer):
        J = jax.jacfwd(lambda v: nn.dense(vec.unvec_dense(v, d_in, d_out), x).reshape(-1))(
            vec.vec_dense(layer))
        points = curvature.LayerPoints(jnp.repeat(a_bar, d_out, axis=0)[None],
                                       jnp.tile(jnp.eye(d_out), (n, 1))[None])
        return J, kfac.to_dense(points.factor())[0], vec.vec_dense(layer)

    J, dense, flat = compute(layer)
    np.testing.assert_allclose(dense, J.T @ J, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(flat, np.concatenate([layer["w"], layer["b"][None]]).ravel())


def kron_chain_rule(dM, A, G):
    """Gradients w.r.t. A and G of a scalar with gradient dM w.r.t. M = A ⊗ G + δI."""
    p, q = A.shape[-1], G.shape[-1]
    dM4 = dM.reshape((*dM.shape[:-2], p, q, p, q))
    return np.einsum("...ijkl,...jl->...ik", dM4, G), np.einsum("...ijkl,...ik->...jl", dM4, A)


def test_logdet_gradient_matches_closed_form_with_repeated_eigenvalues():
    """A from 2 points in 4 dims has a repeated zero eigenvalue; d log det M = tr(M⁻¹ dM)."""
    factor = random_factor(19, 4, 3, (2,), rank_a=2)
    got = jax.jit(jax.grad(lambda A, G, d: jnp.sum(kfac.logdet(kfac.KroneckerFactor(A, G), d)),
                           argnums=(0, 1, 2)))(factor.A, factor.G, 0.2)
    inverse = np.linalg.inv(dense_kron(factor, 0.2))  # symmetric: M⁻ᵀ = M⁻¹
    expected = (*kron_chain_rule(inverse, factor.A, factor.G),
                np.trace(inverse, axis1=-2, axis2=-1).sum())
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


def test_solve_gradient_matches_closed_form():
    """L = wᵀM⁻¹v: ∂L/∂v = M⁻ᵀw = y and ∂L/∂M = −y xᵀ with x = M⁻¹v; A is rank 1."""
    factor = random_factor(20, 3, 2, (2,), rank_a=1)
    v, w = normal(21, (2, 6)), normal(22, (2, 6))

    def loss(A, G, damping, v):
        return jnp.sum(w * kfac.solve(kfac.KroneckerFactor(A, G), v, damping))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(factor.A, factor.G, 0.3, v)
    M = dense_kron(factor, 0.3)
    x = np.linalg.solve(M, v[..., None])[..., 0]
    y = np.linalg.solve(np.swapaxes(M, -1, -2), w[..., None])[..., 0]
    dM = -y[..., :, None] * x[..., None, :]
    expected = (*kron_chain_rule(dM, factor.A, factor.G),
                np.trace(dM, axis1=-2, axis2=-1).sum(), y)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank_a", [4, 1])
def test_inverse_sqrt_jvp_matches_finite_differences(rank_a):
    """Along A(t) = X(t)X(t)ᵀ, PSD for every t even when A is singular (rank_a = 1)."""
    X, dX = normal(23, (3, rank_a)), normal(24, (3, rank_a))
    G, dG = random_psd(25, (), 2), random_psd(26, (), 2)
    z = normal(27, (6,))

    @jax.jit
    def fn(t):
        A = (X + t * dX) @ (X + t * dX).T / rank_a
        return kfac.inverse_sqrt_matvec(kfac.KroneckerFactor(A, G + t * dG), z, 0.4 + 0.1 * t)

    _, tangent = jax.jvp(fn, (0.0,), (1.0,))
    h = 1e-5
    np.testing.assert_allclose(tangent, (fn(h) - fn(-h)) / (2 * h), rtol=1e-6, atol=1e-8)


def test_non_psd_factor_gives_nan_for_that_task_only():
    factor = random_factor(28, 3, 2, (2,))
    A = factor.A.copy()
    A[1] = np.diag([1.0, 0.5, -0.1])
    bad = kfac.KroneckerFactor(A, factor.G)

    @jax.jit
    def everything(factor, rng_key):
        # damping 1 would hide the negative eigenvalue: it must not be clipped.
        return (kfac.logdet(factor, 1.0), kfac.solve(factor, jnp.ones((2, 6)), 1.0),
                kfac.sample(rng_key, factor, 1.0, 2), kfac.min_eigenvalues(factor)[0])

    values, solved, draws, min_a = everything(bad, jax.random.PRNGKey(0))
    assert np.isfinite(values[0]) and np.isnan(values[1])
    assert np.all(np.isfinite(solved[0])) and np.all(np.isnan(solved[1]))
    assert np.all(np.isfinite(draws[:, 0])) and np.all(np.isnan(draws[:, 1]))
    np.testing.assert_allclose(min_a[1], -0.1)


def test_roundoff_negative_eigenvalues_are_zero_not_nan():
    x = normal(29, (2, 5))  # 2 points, 5 inputs: A has rank 2 of 6

    @jax.jit
    def compute(x):
        a_bar = jnp.concatenate([x, jnp.ones((2, 1))], axis=1)
        factor = curvature.LayerPoints(a_bar[None], jnp.ones((1, 2, 1))).factor()
        return (kfac.min_eigenvalues(factor)[0][0], kfac.logdet(factor, 1e-3)[0],
                kfac.logdet(factor)[0])

    min_a, damped, undamped = compute(x)
    assert float(min_a) < 1e-14
    assert np.isfinite(float(damped)) and float(undamped) == -np.inf


def test_vmap_and_per_task_damping_agree():
    factor = random_factor(30, 4, 3, (5,))
    v = normal(31, (5, 12))

    @jax.jit
    def compute(factor, v):
        return (kfac.logdet(factor, 0.1), jax.vmap(kfac.logdet, in_axes=(0, None))(factor, 0.1),
                kfac.logdet(factor, jnp.full((5,), 0.1)), kfac.solve(factor, v, 0.1),
                jax.vmap(kfac.solve, in_axes=(0, 0, None))(factor, v, 0.1))

    direct, mapped, per_task, solved, solved_mapped = compute(factor, v)
    np.testing.assert_allclose(mapped, direct, atol=1e-12)
    np.testing.assert_allclose(per_task, direct, atol=1e-12)
    np.testing.assert_allclose(solved_mapped, solved, atol=1e-12)


def test_kfac_curvature_blocks():
    factors = (random_factor(32, 3, 2, (2,)), random_factor(33, 2, 1, (2,)))
    v = normal(34, (2, 8))

    @jax.jit
    def methods(factors, v, rng_key):
        curvature = kfac.KFACCurvature(factors, 0.2)
        return (curvature.dense(), curvature.logdet(), curvature.solve(v),
                curvature.sample(rng_key, 4), curvature.min_eigenvalue())

    dense, logdet, solved, draws, min_eigenvalue = methods(factors, v, jax.random.PRNGKey(32))
    assert dense.shape == (2, 8, 8) and draws.shape == (4, 2, 8)
    np.testing.assert_allclose(dense[:, :6, :6], dense_kron(factors[0], 0.2), atol=1e-14)
    np.testing.assert_allclose(dense[:, :6, 6:], 0.0)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(dense)[1], atol=1e-10)
    np.testing.assert_allclose(solved, np.linalg.solve(dense, v[..., None])[..., 0], atol=1e-10)
    np.testing.assert_allclose(min_eigenvalue, np.linalg.eigvalsh(dense)[:, 0], atol=1e-10)


def test_vec_round_trips_and_shape_errors():
    params = numpy_mlp(35, (2, 3, 1))
    v = vec.vec_mlp(params)
    assert v.shape == (nn.num_params(params),)
    back = vec.unvec_mlp(v, (2, 3, 1))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    factor = random_factor(36, 3, 2, ())
    with pytest.raises(ValueError, match=r"expected vectors \(\.\.\., 6\)"):
        kfac.solve(factor, np.ones(5))
    with pytest.raises(ValueError, match=r"unvec_mlp: expected \(\.\.\., 13\)"):
        vec.unvec_mlp(np.ones(12), (2, 3, 1))


def test_kron_min_eigenvalue_is_the_smallest_eigenvalue_of_the_kronecker_product():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(3, 4, 4))
    g = rng.normal(size=(3, 2, 2))
    # Indefinite factors too: the minimum can be (largest a) × (smallest g) and so on.
    factor = kfac.KroneckerFactor(a + np.swapaxes(a, -1, -2), g + np.swapaxes(g, -1, -2))
    expected = [np.linalg.eigvalsh(np.kron(A, G))[0]
                for A, G in zip(factor.A, factor.G, strict=True)]
    np.testing.assert_allclose(kfac.kron_min_eigenvalue(factor), expected, rtol=1e-10)


# ------------------------------------------------- the Gram trick (curvature.KFACTaskCurvature)

# (points n, inputs p, outputs q) per layer: n < p and n < q (both factors from n × n Gram
# matrices), n < p ≤ ... with n ≥ q, n ≥ p (no Gram), n = p, and one output unit.
GRAM_LAYERS = ((3, 6, 5), (3, 6, 2), (7, 4, 3), (4, 4, 6), (3, 5, 1))


def layer_points(seed, tasks, n, p, q):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(tasks, n, p))
    inputs[..., -1] = 1.0  # the bias entry of ā
    return curvature.LayerPoints(inputs, rng.normal(size=(tasks, n, q)))


def dense_layers_logdet(layers, damping):
    """Σ_l slogdet(np.kron(A_l, G_l) + δI) per task, A = ĀᵀĀ/n, G = Σ g gᵀ (float64 numpy)."""
    total = 0.0
    for layer in layers:
        a, g = np.asarray(layer.inputs), np.asarray(layer.output_grads)
        A = np.einsum("tni,tnj->tij", a, a) / a.shape[-2]
        G = np.einsum("tni,tnj->tij", g, g)
        total = total + np.array([
            np.linalg.slogdet(np.kron(A_t, G_t) + damping * np.eye(len(A_t) * len(G_t)))[1]
            for A_t, G_t in zip(A, G, strict=True)])
    return total


def task_curvature(layers, damping):
    d = sum(layer.inputs.shape[-1] * layer.output_grads.shape[-1] for layer in layers)
    return curvature.KFACTaskCurvature(tuple(layers), np.arange(d), damping)


@pytest.mark.parametrize("shape", GRAM_LAYERS)
@pytest.mark.parametrize("damping", [1e-4, 0.3, 10.0])
def test_gram_logdet_equals_dense_kron(shape, damping):
    layers = [layer_points(40, 3, *shape)]
    got = jax.jit(lambda ls: task_curvature(ls, damping).logdet())(layers)
    np.testing.assert_allclose(got, dense_layers_logdet(layers, damping), rtol=0, atol=1e-8)


def test_gram_logdet_several_layers_and_its_gradient_equal_dense():
    layers = [layer_points(41, 2, *shape) for shape in GRAM_LAYERS]
    damping = 0.05
    got = task_curvature(layers, damping).logdet()
    np.testing.assert_allclose(got, dense_layers_logdet(layers, damping), atol=1e-8)

    def dense(layers):  # the same log det through jnp.kron, differentiable
        total = 0.0
        for layer in layers:
            a, g = layer.inputs, layer.output_grads
            A = jnp.einsum("tni,tnj->tij", a, a) / a.shape[-2]
            G = jnp.einsum("tni,tnj->tij", g, g)
            kron = jax.vmap(jnp.kron)(A, G) + damping * jnp.eye(A.shape[-1] * G.shape[-1])
            total = total + jnp.linalg.slogdet(kron)[1]
        return jnp.sum(total)

    grad = jax.grad(lambda ls: jnp.sum(task_curvature(ls, damping).logdet()))(layers)
    expected = jax.grad(dense)(layers)
    for got_leaf, want_leaf in zip(jax.tree.leaves(grad), jax.tree.leaves(expected),
                                   strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-8, atol=1e-8)


def test_gram_logdet_without_damping():
    # n ≥ p and n ≥ q: full rank, finite; n < p: A ⊗ G singular, log det = −inf exactly.
    full_rank = [layer_points(42, 2, 7, 4, 3)]
    np.testing.assert_allclose(task_curvature(full_rank, 0.0).logdet(),
                               dense_layers_logdet(full_rank, 0.0), atol=1e-8)
    low_rank = [layer_points(43, 2, 3, 6, 5)]
    assert np.all(np.isneginf(task_curvature(low_rank, 0.0).logdet()))


@pytest.mark.parametrize("shape", [(3, 6, 5), (7, 4, 3)])
def test_gram_min_eigenvalue_and_solve_match_dense(shape):
    layers = [layer_points(44, 2, *shape)]
    block = task_curvature(layers, 0.2)
    dense = np.asarray(block.dense())
    np.testing.assert_allclose(block.min_eigenvalue(), np.linalg.eigvalsh(dense)[:, 0],
                               atol=1e-8)
    v = normal(45, (2, dense.shape[-1]))
    np.testing.assert_allclose(block.solve(v), np.linalg.solve(dense, v[..., None])[..., 0],
                               atol=1e-8)

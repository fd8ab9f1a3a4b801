"""TaskPosterior and laplace_task_posterior: every precision structure against its dense matrix,
exact conjugate posteriors and predictives, MAML's implicit prior through structured
curvatures, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.curvature import GGN, KFAC, GGNCurvature, KFACTaskCurvature, LayerPoints
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.posterior import TaskPosterior, laplace_task_posterior
from numpyro_hbmeta.infer.precision import (
    DensePrecision,
    DiagPrecision,
    KroneckerPrecision,
    LowRankPrecision,
    as_precision,
)
from numpyro_hbmeta.models import linear
from numpyro_hbmeta.nn.layers import dense_layer

SIGMA = 0.5
TASKS = 3
# Where P does not depend on φ̂ (linear nets) or is compared at the posterior's own φ̂, a
# two-step MAP-GD is the inner solver: it compiles in a fraction of Newton's time.
MAP_GD = hbm.TruncatedGD(2, 0.01, prior="explicit")


def gaussian_log_density(value, mean, precision):
    """log N(value | mean, precision⁻¹) from the dense matrix, (..., tasks)."""
    diff = np.asarray(value) - mean
    quad = np.einsum("...ti,tij,...tj->...t", diff, precision, diff)
    logdet = np.linalg.slogdet(precision)[1]
    return -0.5 * (quad + mean.shape[-1] * np.log(2 * np.pi) - logdet)


@jax.jit
def dense_view(posterior, value):
    """Everything a test compares, in one compiled call (the posterior is a pytree)."""
    return {"precision": posterior.precision_matrix, "covariance": posterior.covariance_matrix,
            "log_prob": posterior.log_prob(value), "mean": posterior.mean}


def spd(rng, batch, n, shift=0.5):
    m = rng.normal(size=(*batch, n, n))
    return m @ np.swapaxes(m, -1, -2) / n + shift * np.eye(n)


def dense_structure(rng, d):
    matrix = spd(rng, (TASKS,), d)
    return DensePrecision.from_matrix(jnp.asarray(matrix)), matrix


def diag_structure(rng, d):
    diagonal = rng.uniform(0.5, 2.0, size=(TASKS, d))
    return DiagPrecision(jnp.asarray(diagonal)), np.stack([np.diag(v) for v in diagonal])


def kron_structure(rng, d):
    # Two layers, (p, q) = (3, 2) and (2, 2): d = 10, in a shuffled order of Φ's columns.
    assert d == 10
    order = rng.permutation(d)
    bases_a, bases_g, eigenvalues, blocks = [], [], [], []
    for (p, q), damping in (((3, 2), 0.3), ((2, 2), 0.7)):
        A, G = spd(rng, (TASKS,), p, 0.0), spd(rng, (TASKS,), q, 0.0)
        a, u_a = np.linalg.eigh(A)
        g, u_g = np.linalg.eigh(G)
        bases_a.append(jnp.asarray(u_a))
        bases_g.append(jnp.asarray(u_g))
        eigenvalues.append(jnp.asarray(a[:, :, None] * g[:, None, :] + damping))
        blocks.append(np.einsum("tik,tjl->tijkl", A, G).reshape(TASKS, p * q, p * q)
                      + damping * np.eye(p * q))
    kfac_order = np.zeros((TASKS, d, d))
    kfac_order[:, :6, :6], kfac_order[:, 6:, 6:] = blocks
    inverse = np.argsort(order)
    matrix = kfac_order[:, inverse][:, :, inverse]
    structure = KroneckerPrecision(tuple(bases_a), tuple(bases_g), tuple(eigenvalues),
                                   tuple(int(i) for i in order))
    return structure, matrix


def low_rank_structure(rng, d):
    # D + WᵀW with n = 3 < d rows, D a non-isotropic diagonal.
    w = rng.normal(size=(TASKS, 3, d))
    diagonal = rng.uniform(0.5, 2.0, size=(TASKS, d))
    _, s, vt = np.linalg.svd(w / np.sqrt(diagonal)[:, None, :], full_matrices=False)
    structure = LowRankPrecision(jnp.asarray(diagonal), jnp.asarray(np.swapaxes(vt, -1, -2)),
                                 jnp.asarray(s**2))
    matrix = np.stack([np.diag(v) for v in diagonal]) + np.swapaxes(w, -1, -2) @ w
    return structure, matrix


STRUCTURES = {"full": dense_structure, "diag": diag_structure, "kfac": kron_structure,
              "ggn": low_rank_structure}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structure_equals_its_dense_gaussian(x64, name):
    rng = np.random.default_rng(0)
    d = 10
    structure, matrix = STRUCTURES[name](rng, d)
    loc = rng.normal(size=(TASKS, d))
    posterior = TaskPosterior(jnp.asarray(loc), structure)
    assert posterior.batch_shape == (TASKS,) and posterior.event_shape == (d,)
    value = rng.normal(size=(4, 2, TASKS, d))
    v = rng.normal(size=(TASKS, d))
    key = jax.random.PRNGKey(1)

    @jax.jit
    def evaluate(posterior, value, v):
        structure = posterior.precision
        return {**dense_view(posterior, value), "solve": structure.solve(v),
                "root": posterior._scale_matrix(), "draws": posterior.sample(key, (5,)),
                "entropy": posterior.entropy(), "ok": structure.is_positive_definite(),
                "lowest": structure.min_eigenvalue()}

    out = evaluate(posterior, jnp.asarray(value), jnp.asarray(v))
    np.testing.assert_allclose(out["precision"], matrix, rtol=1e-10, atol=1e-12)
    covariance = np.linalg.inv(matrix)
    np.testing.assert_allclose(out["covariance"], covariance, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["log_prob"], gaussian_log_density(value, loc, matrix),
                               rtol=1e-10)
    np.testing.assert_allclose(out["solve"], np.linalg.solve(matrix, v[..., None])[..., 0],
                               rtol=1e-9, atol=1e-12)
    # Draws are φ̂ + S z with the z of the key and S Sᵀ = P⁻¹: exact, no sampling tolerance.
    root = np.asarray(out["root"])
    np.testing.assert_allclose(root @ np.swapaxes(root, -1, -2), covariance, rtol=1e-9,
                               atol=1e-12)
    z = np.asarray(jax.random.normal(key, (5, TASKS, d)))
    np.testing.assert_allclose(out["draws"], loc + np.einsum("tik,stk->sti", root, z),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["entropy"], 0.5 * (d * (1 + np.log(2 * np.pi))
                                                      - np.linalg.slogdet(matrix)[1]),
                               rtol=1e-10)
    assert np.all(out["ok"])
    lowest = np.linalg.eigvalsh(matrix)[:, 0]
    if name == "ggn":  # a lower bound for a non-isotropic D
        assert np.all(np.asarray(out["lowest"]) <= lowest + 1e-12)
    else:
        np.testing.assert_allclose(out["lowest"], lowest, rtol=1e-9)


def test_posterior_passes_through_jit(x64):
    rng = np.random.default_rng(1)
    structure, matrix = kron_structure(rng, 10)
    loc = rng.normal(size=(TASKS, 10))
    posterior = TaskPosterior(jnp.asarray(loc), structure)
    leaves, treedef = jax.tree.flatten(posterior)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.batch_shape == (TASKS,) and rebuilt.precision.order == structure.order
    draws = jax.jit(lambda p, key: p.sample(key, (2,)))(posterior, jax.random.PRNGKey(3))
    out = dense_view(rebuilt, draws)
    np.testing.assert_allclose(out["log_prob"], gaussian_log_density(draws, loc, matrix),
                               rtol=1e-10)
    with pytest.raises(ValueError, match="TaskContext"):
        posterior.to_sites(draws)


def test_as_precision_keeps_a_curvature_object_as_it_is(x64):
    # The curvature as the whole precision (LLAMA's F + δI predictive), for GGN in both
    # forms and K-FAC with two layers in a shuffled order.
    rng = np.random.default_rng(5)
    layers = (LayerPoints(jnp.asarray(rng.normal(size=(TASKS, 4, 3))),
                          jnp.asarray(rng.normal(size=(TASKS, 4, 2)))),
              LayerPoints(jnp.asarray(rng.normal(size=(TASKS, 4, 2))),
                          jnp.asarray(rng.normal(size=(TASKS, 4, 1)))))
    curvatures = [KFACTaskCurvature(layers, rng.permutation(8), 0.3),
                  GGNCurvature(jnp.asarray(rng.normal(size=(TASKS, 3, 8))), 0.3),
                  GGNCurvature(jnp.asarray(rng.normal(size=(TASKS, 9, 8))), 0.3)]
    for curvature, structure in zip(curvatures, (KroneckerPrecision, LowRankPrecision,
                                                 DensePrecision), strict=True):
        precision = as_precision(curvature)
        assert isinstance(precision, structure)
        np.testing.assert_allclose(jax.jit(lambda p: p.dense())(precision),
                                   curvature.dense(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- linear zoo model


@pytest.fixture
def linear_case(x64):
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=4, num_support=6, num_query=5)
    params = {"theta": jnp.array([0.8, -0.3]), "tau": jnp.array(0.6),
              "sigma": jnp.array(0.4)}
    return data, params


def test_full_laplace_posterior_and_predictive_are_the_conjugate_ones(linear_case):
    data, params = linear_case
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton())
    posterior = laplace_task_posterior(marginal, params, data.support)
    mean, cov = (np.asarray(a) for a in linear.exact_task_posterior(params, data.support))
    assert isinstance(posterior.precision, DensePrecision)
    value = np.random.default_rng(2).normal(size=(3, 4, 2))
    out = dense_view(posterior, jnp.asarray(value))
    np.testing.assert_allclose(out["mean"], mean, rtol=1e-8)
    np.testing.assert_allclose(out["covariance"], cov, rtol=1e-8)
    np.testing.assert_allclose(out["log_prob"],
                               gaussian_log_density(value, mean, np.linalg.inv(cov)), rtol=1e-8)
    sites = posterior.to_sites(posterior.sample(jax.random.PRNGKey(0), (7,)))
    assert sites["phi"].shape == (7, 4, 1, 2)
    # The GLM predictive of f = x·φ is exact: m ≤ d points go through VJPs and solves,
    # m > d through JVPs of S's columns; draws use the z of the key (f is linear).
    key = jax.random.PRNGKey(4)
    draws = posterior.sample(key, (3,))
    for num_points in (2, 5):
        x = np.asarray(data.query["x"])[:, :num_points]
        predictive = jax.jit(lambda p, x=x: p.linearised_predictive(
            lambda phi: jnp.einsum("tnf,tf->tn", x, phi), rng_key=key, num_samples=3))(
                posterior)
        np.testing.assert_allclose(predictive.mean, np.einsum("tnf,tf->tn", x, mean),
                                   rtol=1e-8)
        np.testing.assert_allclose(predictive.covariance, x @ cov @ np.swapaxes(x, -1, -2),
                                   rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(predictive.draws, np.einsum("tnf,stf->stn", x, draws),
                                   rtol=1e-8, atol=1e-12)


def test_non_positive_definite_precision_is_reported(linear_case):
    data, params = linear_case
    marginal = hbm.meta_marginal(linear.model, inner=hbm.TruncatedGD(5, 10.0),
                                 objective="maml")
    with pytest.raises(FloatingPointError, match=r"not positive definite for task\(s\) \[0"):
        laplace_task_posterior(marginal, params, data.support)


# --------------------------------------------------------------------------- dense-layer nets


def linear_net(x, y=None, *, bias_scale=1.0):
    """One dense layer, one output unit; Φ = [b, w] is not K-FAC's [w; b] order."""
    features = x.shape[-1]
    theta_b = numpyro.sample("theta_b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    theta_w = numpyro.sample("theta_w", dist.Normal(0.0, 1.0).expand([1, features]).to_event(2))
    with hbm.tasks(x.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(theta_b, bias_scale).to_event(1))
        w = numpyro.sample("w", dist.Normal(theta_w, 1.0).to_event(2))
        mean = dense_layer("out", x, jnp.swapaxes(w[:, 0], -1, -2), b[:, 0])[..., 0]
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(mean, SIGMA), obs=y)


def wide_bias_net(x, y=None):
    return linear_net(x, y, bias_scale=2.0)


def net_data(seed, num_points, features=3):
    rng = np.random.default_rng(seed)
    support = {"x": rng.normal(size=(TASKS, num_points, features)),
               "y": rng.normal(size=(TASKS, num_points))}
    params = {"theta_b": rng.normal(size=(1,)), "theta_w": rng.normal(size=(1, features))}
    return support, params


def fisher(support):
    """σ⁻² X̄ᵀX̄ per task in Φ's layout [b, w]."""
    x = np.asarray(support["x"])
    x_bar = np.concatenate([np.ones((*x.shape[:-1], 1)), x], -1)
    return np.einsum("jni,jnk->jik", x_bar, x_bar) / SIGMA**2


def implicit_map(eigenvalues, num_steps, step_size):
    return eigenvalues / (1 - (1 - step_size * eigenvalues) ** num_steps)


@pytest.mark.parametrize("curvature,num_points,structure", [
    (KFAC(damping=0.2), 6, KroneckerPrecision),
    (GGN(damping=0.2), 6, DensePrecision),  # n ≥ d: the primal matrix
    (GGN(damping=0.2), 2, LowRankPrecision),  # n < d: the dual form
])
def test_fisher_curvature_plus_isotropic_prior_is_exact(x64, curvature, num_points,
                                                        structure):
    # One output unit, Gaussian noise: K-FAC and the GGN are σ⁻²X̄ᵀX̄; the prior N(θ, I)
    # adds I: P = σ⁻²X̄ᵀX̄ + (1 + δ) I, the exact Hessian of the log joint plus δ.
    support, params = net_data(0, num_points)
    marginal = hbm.meta_marginal(linear_net, inner=MAP_GD, objective="llama",
                                 curvature=curvature)
    posterior = laplace_task_posterior(marginal, params, support)
    assert isinstance(posterior.precision, structure)
    expected = fisher(support) + 1.2 * np.eye(4)
    value = np.random.default_rng(1).normal(size=(2, TASKS, 4))
    out = dense_view(posterior, jnp.asarray(value))
    np.testing.assert_allclose(out["precision"], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["covariance"], np.linalg.inv(expected), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(out["log_prob"],
                               gaussian_log_density(value, np.asarray(out["mean"]), expected),
                               rtol=1e-9)


def test_ggn_folds_a_diagonal_prior_and_kfac_refuses_one_that_varies_within_a_layer(x64):
    support, params = net_data(1, 2)
    ggn = hbm.meta_marginal(wide_bias_net, inner=MAP_GD, objective="llama",
                            curvature=GGN(damping=0.2))
    posterior = laplace_task_posterior(ggn, params, support)
    prior = np.diag([0.25, 1.0, 1.0, 1.0])  # b ~ N(θ_b, 2²), w ~ N(θ_w, 1)
    np.testing.assert_allclose(dense_view(posterior, posterior.mean)["precision"],
                               fisher(support) + prior + 0.2 * np.eye(4), rtol=1e-9)
    kfac = hbm.meta_marginal(wide_bias_net, inner=MAP_GD, objective="llama",
                             curvature=KFAC(damping=0.2))
    with pytest.raises(ValueError, match="differs within a K-FAC layer"):
        laplace_task_posterior(kfac, params, support)


def test_kfac_posterior_of_a_two_layer_net_is_its_kfac_matrix_plus_the_prior(x64):
    # A non-linear net, where K-FAC is an approximation: the posterior is the K-FAC matrix
    # of the builder plus the prior precision, in Φ's layout.
    rng = np.random.default_rng(2)
    support = {"x": rng.normal(size=(TASKS, 5, 3)), "y": rng.normal(size=(TASKS, 5))}
    params = {"theta": rng.normal(size=(14,))}
    marginal = hbm.meta_marginal(tanh_net_full, inner=MAP_GD, objective="llama",
                                 curvature=KFAC(damping=0.1))
    posterior = laplace_task_posterior(marginal, params, support)
    assert isinstance(posterior.precision, KroneckerPrecision)
    assert posterior.precision.order != tuple(range(14))
    observations = context_at(tanh_net_full, params, support).observations(tanh_net_full,
                                                                         support)
    kfac = jax.jit(lambda phi: marginal.build(None, phi, observations).dense())
    expected = np.asarray(kfac(posterior.mean)) + 4.0 * np.eye(14)  # prior N(θ, 0.5²)
    value = rng.normal(size=(2, TASKS, 14))
    out = dense_view(posterior, jnp.asarray(value))
    np.testing.assert_allclose(out["precision"], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["log_prob"],
                               gaussian_log_density(value, np.asarray(out["mean"]), expected),
                               rtol=1e-9)
    # The linearised predictive of the network at new inputs against dense Jacobians.
    x_new = rng.normal(size=(TASKS, 4, 3))
    predictive = jax.jit(lambda p: p.linearised_predictive(
        lambda phi: two_layer_outputs(phi, x_new)))(posterior)
    jac = jax.jit(jax.vmap(jax.jacobian(lambda p, x: two_layer_outputs(p[None], x[None])[0])))(
        posterior.mean, x_new)
    np.testing.assert_allclose(predictive.covariance,
                               jac @ np.linalg.inv(expected) @ np.swapaxes(jac, -1, -2),
                               rtol=1e-8, atol=1e-12)


def two_layer_outputs(phi, x):
    hidden = jnp.tanh(dense_layer("hidden", x, phi[:, :6].reshape(-1, 3, 2), phi[:, 6:8]))
    w_out = jnp.swapaxes(phi[:, 8:12].reshape(-1, 2, 2), -1, -2)  # stored transposed
    return jnp.sum(dense_layer("out", hidden, w_out, phi[:, 12:14]), -1)


def tanh_net_full(x, y=None):
    """Two dense layers 3 -> 2 -> 2 with the output weights stored transposed, so Φ's
    layout is not K-FAC's row-major vec."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([14]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 0.5).to_event(1))[:, 0]
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(two_layer_outputs(phi, x), SIGMA), obs=y)


# --------------------------------------------------------------------------- implicit prior


def test_implicit_prior_through_fisher_curvatures_equals_the_full_one(x64):
    # For a quadratic loss whose Hessian H K-FAC and the GGN reproduce exactly (one output
    # unit, n ≥ d), g(H) = Q(H) + H, MAML's implicit prior plus the support curvature: the
    # structured posteriors equal the dense one built from implicit_prior (test_eb checks
    # that one against hbm.implicit_prior), and the closed form O g(λ) Oᵀ.
    support, params = net_data(3, 6)
    inner = hbm.TruncatedGD(3, 0.01)
    full = laplace_task_posterior(hbm.meta_marginal(linear_net, inner=inner, objective="maml"),
                                  params, support)
    reference = dense_view(full, full.mean)
    values, vectors = np.linalg.eigh(fisher(support))
    np.testing.assert_allclose(
        reference["precision"],
        np.einsum("tik,tk,tjk->tij", vectors, implicit_map(values, 3, 0.01), vectors),
        rtol=1e-9)
    for curvature, structure in ((KFAC(damping=0.0), KroneckerPrecision),
                                 (GGN(damping=0.0), DensePrecision)):
        structured = laplace_task_posterior(
            hbm.meta_marginal(linear_net, inner=inner, objective="llama", curvature=curvature),
            params, support)
        assert isinstance(structured.precision, structure)
        out = dense_view(structured, full.mean)
        np.testing.assert_allclose(out["mean"], reference["mean"], rtol=1e-10)
        np.testing.assert_allclose(out["precision"], reference["precision"], rtol=1e-9)


def test_implicit_prior_through_diag_and_dual_ggn_is_the_spectral_map(x64):
    support, params = net_data(4, 2)  # n = 2 < d = 4: the dual form
    inner = hbm.TruncatedGD(4, 0.02)
    damping = 0.3
    ggn = laplace_task_posterior(
        hbm.meta_marginal(linear_net, inner=inner, objective="llama",
                          curvature=GGN(damping=damping)), params, support)
    assert isinstance(ggn.precision, LowRankPrecision)
    values, vectors = np.linalg.eigh(fisher(support) + damping * np.eye(4))
    expected = np.einsum("tik,tk,tjk->tij", vectors, implicit_map(values, 4, 0.02), vectors)
    np.testing.assert_allclose(dense_view(ggn, ggn.mean)["precision"], expected, rtol=1e-9)
    diag = laplace_task_posterior(
        hbm.meta_marginal(linear_net, inner=inner, objective="llama", curvature="diag"),
        params, support)
    assert isinstance(diag.precision, DiagPrecision)
    h = np.diagonal(fisher(support), axis1=-2, axis2=-1)
    np.testing.assert_allclose(diag.precision.diagonal, implicit_map(h, 4, 0.02), rtol=1e-9)

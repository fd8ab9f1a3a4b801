"""meta_marginal: Laplace evidence exactness, objectives, structure of the emitted model."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


def per_task(marginal, params, *data):
    """The per-task factor the marginal model emits, (tasks,); traceable."""
    _, tr = log_density(marginal, data, {}, params)
    return tr["hbm_objective"]["fn"].log_factor.reshape(-1)


def sites(marginal, params, *data):
    """Every recorded value of the marginal model at ``params``, computed under jit."""

    def run(p):
        _, tr = log_density(marginal, data, {}, p)
        return {n: s["value"] for n, s in tr.items() if s["type"] == "deterministic"}

    return jax.jit(run)(params)


def objective_per_task(marginal, params, *data):
    return jax.jit(lambda p: per_task(marginal, p, *data))(params)


def random_params(seed, features):
    rng = np.random.default_rng(seed)
    return {"theta": rng.normal(size=features), "tau": np.exp(0.3 * rng.normal()),
            "sigma": np.exp(0.3 * rng.normal())}


@pytest.mark.parametrize("num_tasks,num_points,features", [(1, 1, 1), (5, 3, 2), (4, 12, 3),
                                                           (7, 2, 4)])
def test_laplace_newton_evidence_is_exact(x64, num_tasks, num_points, features):
    key = jax.random.PRNGKey(num_tasks * 100 + num_points * 10 + features)
    data = linear.simulate(key, num_tasks=num_tasks, num_support=num_points,
                           theta=jnp.linspace(-1, 1, features)).support
    params = random_params(num_tasks + num_points + features, features)
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton())

    @jax.jit
    def compare(p):
        handler = lambda q: per_task(marginal, q, data)  # noqa: E731
        exact = lambda q: linear.exact_log_evidence(q, data)  # noqa: E731
        return (handler(p), exact(p), jax.grad(lambda q: handler(q).sum())(p),
                jax.grad(lambda q: exact(q).sum())(p))

    value, exact, grads, exact_grads = compare(params)
    assert np.max(np.abs(value - exact)) <= 1e-6
    for name in params:
        np.testing.assert_allclose(grads[name], exact_grads[name], rtol=1e-7, atol=1e-8)


def test_phi_hat_recorded_and_newton_converges(linear_data):
    params = random_params(3, 2)
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton())
    recorded = sites(marginal, params, linear_data.support)
    mean, _ = linear.exact_task_posterior(params, linear_data.support)
    np.testing.assert_allclose(recorded["phi"][:, 0, :], mean, atol=1e-10)
    assert bool(jnp.all(recorded["hbm_inner_converged"]))
    factor = jax.eval_shape(lambda p: log_density(marginal, (linear_data.support,), {}, p)[1][
        "hbm_objective"]["fn"].log_factor, params)
    assert factor.shape == (6, 1)  # shaped to the plate's dim (-2), never (6, 6)


def test_marginal_has_only_global_latent_sites(linear_data):
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton())
    def latent_names():
        tr = handlers.trace(handlers.seed(marginal, 0)).get_trace(linear_data.support)
        return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]

    names = []
    jax.eval_shape(lambda: names.extend(latent_names()))
    latent = set(names)
    assert latent == {"theta", "tau", "sigma"}


def test_llama_with_eta_zero_equals_maml(linear_data):
    params = random_params(4, 2)
    inner = hbm.TruncatedGD(3, 0.01)
    maml = hbm.meta_marginal(linear.model, inner=inner, objective="maml")
    llama = hbm.meta_marginal(linear.model, inner=inner, objective="llama", eta=0.0)
    a = objective_per_task(maml, params, linear_data.support, linear_data.query)
    b = objective_per_task(llama, params, linear_data.support, linear_data.query)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_llama_penalty_is_eta_logdet(linear_data):
    params = random_params(5, 2)
    inner = hbm.TruncatedGD(3, 0.01)
    eta = 0.3
    maml = hbm.meta_marginal(linear.model, inner=inner, objective="maml")
    llama = hbm.meta_marginal(linear.model, inner=inner, objective="llama", eta=eta)
    a = objective_per_task(maml, params, linear_data.support, linear_data.query)
    b = objective_per_task(llama, params, linear_data.support, linear_data.query)
    x = linear_data.query["x"]
    hessian = jnp.einsum("jnf,jng->jfg", x, x) / params["sigma"] ** 2  # query NLL curvature
    np.testing.assert_allclose(a - b, eta * jnp.linalg.slogdet(hessian)[1], rtol=1e-10)


def test_diag_equals_full_when_hessian_is_diagonal(x64):
    # Orthogonal design columns in every task make XᵀX, hence the Hessian, diagonal.
    key = jax.random.PRNGKey(6)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (5, 8, 3)))
    x = q * jnp.array([1.0, 2.0, 0.5])
    y = jax.random.normal(jax.random.fold_in(key, 1), (5, 8))
    data = {"x": x, "y": y}
    params = random_params(7, 3)
    full = hbm.meta_marginal(linear.model, inner=hbm.Newton(), curvature="full")
    diag = hbm.meta_marginal(linear.model, inner=hbm.Newton(), curvature="diag")
    a = objective_per_task(full, params, data)
    b = objective_per_task(diag, params, data)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sites(full, params, data)["hbm_curvature_min_eigenvalue"],
                               sites(diag, params, data)["hbm_curvature_min_eigenvalue"],
                               rtol=1e-10)


def test_diag_differs_from_full_for_correlated_design(linear_data):
    params = random_params(8, 2)
    full = hbm.meta_marginal(linear.model, inner=hbm.Newton(), curvature="full")
    diag = hbm.meta_marginal(linear.model, inner=hbm.Newton(), curvature="diag")
    a = objective_per_task(full, params, linear_data.support)
    b = objective_per_task(diag, params, linear_data.support)
    assert np.max(np.abs(a - b)) > 1e-3


def ragged_model(x, y=None, mask=None):
    theta = numpyro.sample("theta", dist.Normal(0.0, 10.0).expand([x.shape[-1]]).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, tau).expand([x.shape[-1]]).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1), handlers.mask(mask=mask):
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), sigma), obs=y)


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_ragged_tasks_match_unpadded_evidence(x64):
    key = jax.random.PRNGKey(9)
    sizes = [3, 7, 1, 5]
    params = random_params(10, 2)
    tasks = [linear.simulate(jax.random.fold_in(key, j), num_tasks=1, num_support=n).support
             for j, n in enumerate(sizes)]
    width = max(sizes)
    # Padding must be finite (a NaN would reach gradients through the masked branch).
    x = jnp.stack([jnp.pad(t["x"][0], ((0, width - t["x"].shape[1]), (0, 0)),
                           constant_values=3.0) for t in tasks])
    y = jnp.stack([jnp.pad(t["y"][0], (0, width - t["y"].shape[1]), constant_values=-7.0)
                   for t in tasks])
    mask = jnp.arange(width)[None, :] < jnp.array(sizes)[:, None]
    marginal = hbm.meta_marginal(ragged_model, inner=hbm.Newton())
    padded = objective_per_task(marginal, params, {"x": x, "y": y, "mask": mask})
    single = hbm.meta_marginal(linear.model, inner=hbm.Newton())
    # The handler on unpadded data, one task at a time (two of them: each is a new compile).
    for j in (0, 2):
        unpadded = objective_per_task(single, params, tasks[j])
        np.testing.assert_allclose(padded[j], unpadded[0], rtol=0, atol=1e-9)
    exact = jnp.concatenate([linear.exact_log_evidence(params, t) for t in tasks])
    np.testing.assert_allclose(padded, exact, rtol=0, atol=1e-9)
    grads = jax.jit(jax.grad(lambda p: log_density(
        marginal, ({"x": x, "y": y, "mask": mask},), {}, p)[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


def test_jit_and_no_jit_agree(linear_data):
    params = random_params(11, 2)
    marginal = hbm.meta_marginal(linear.model, inner=hbm.TruncatedGD(4, 0.01),
                                 objective="llama", eta=0.1)

    def total(p):
        return log_density(marginal, (linear_data.support, linear_data.query), {}, p)[0]

    np.testing.assert_allclose(total(params), jax.jit(total)(params), rtol=1e-12)


def test_constrained_task_sites_work_in_unconstrained_space(x64):
    # A positive task parameter: λ_j ~ LogNormal(μ, s), y ~ Poisson(λ_j). The Laplace
    # evidence in log λ (with the log-Jacobian) matches 1-D quadrature of the true evidence.
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
        with hbm.tasks(y.shape[0], dim=-2):
            lam = numpyro.sample("lam", dist.LogNormal(mu, 0.5))
            with numpyro.plate("points", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Poisson(lam), obs=y)

    y = jnp.array([[3.0, 5, 4, 6, 2, 4, 5, 3] * 5, [10.0, 12, 9, 11, 8, 13, 10, 11] * 5])
    marginal = hbm.meta_marginal(model, inner=hbm.Newton())
    value = objective_per_task(marginal, {"mu": jnp.array(1.2)}, {"y": y})
    recorded = sites(marginal, {"mu": jnp.array(1.2)}, {"y": y})
    grid = jnp.linspace(-3, 5, 20001)
    log_joint = (dist.Normal(1.2, 0.5).log_prob(grid)[:, None]
                 + dist.Poisson(jnp.exp(grid)[:, None, None]).log_prob(y).sum(-1))
    exact = jax.scipy.special.logsumexp(log_joint, axis=0) + jnp.log(grid[1] - grid[0])
    # Laplace error for 40 Poisson counts per task is O(1/n): a few thousandths of a nat.
    np.testing.assert_allclose(value, exact, atol=5e-3)
    assert bool(jnp.all(recorded["lam"] > 0))

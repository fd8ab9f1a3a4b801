"""meta_marginal with curvature="kfac" and "ggn": closed forms on linear-Gaussian nets, the dual
log det, declared layers, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_density, potential_energy

import numpyro_hbmeta as hbm
from numpyro_hbmeta.curvature import GGN, KFAC, GGNCurvature
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.models import logistic
from numpyro_hbmeta.nn.layers import LAYER, dense_layer

SIGMA = 0.5


def linear_net(x, y=None):
    """One dense layer, one output unit, Gaussian noise. The bias site comes first, so Φ =
    [b, w] is not K-FAC's [w; b] order, and w is stored transposed (1, features)."""
    features = x.shape[-1]
    theta_b = numpyro.sample("theta_b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    theta_w = numpyro.sample("theta_w", dist.Normal(0.0, 1.0).expand([1, features]).to_event(2))
    with hbm.tasks(x.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(theta_b, 1.0).to_event(1))  # (tasks, 1, 1)
        w = numpyro.sample("w", dist.Normal(theta_w, 1.0).to_event(2))  # (tasks, 1, 1, f)
        mean = dense_layer("out", x, jnp.swapaxes(w[:, 0], -1, -2), b[:, 0])[..., 0]
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(mean, SIGMA), obs=y)


def linear_data(seed, num_tasks, num_support, num_query, features):
    rng = np.random.default_rng(seed)
    support = {"x": rng.normal(size=(num_tasks, num_support, features)),
               "y": rng.normal(size=(num_tasks, num_support))}
    query = {"x": rng.normal(size=(num_tasks, num_query, features)),
             "y": rng.normal(size=(num_tasks, num_query))}
    params = {"theta_b": rng.normal(size=(1,)), "theta_w": rng.normal(size=(1, features))}
    return support, query, params


def objectives(model, params, support, query, curvatures, *, eta=1.0, maml=True):
    """{label: per-task objective} for maml and llama with each curvature, in one jit."""
    inner = hbm.TruncatedGD(3, 0.05)
    marginals = {"maml": hbm.meta_marginal(model, inner=inner, objective="maml")} if maml else {}
    for label, curvature in curvatures.items():
        marginals[label] = hbm.meta_marginal(model, inner=inner, objective="llama",
                                             curvature=curvature, eta=eta)

    @jax.jit
    def run(p):
        return {label: log_density(m, (support, query), {}, p)[1]["hbm_objective"]["fn"]
                .log_factor.reshape(-1) for label, m in marginals.items()}

    return run(params)


def exact_fisher(query):
    """σ⁻² X̄ᵀX̄ per task in Φ's layout [b, w]: X̄ = [1, x]."""
    x = np.asarray(query["x"])
    x_bar = np.concatenate([np.ones((*x.shape[:-1], 1)), x], -1)
    return np.einsum("jni,jnk->jik", x_bar, x_bar) / SIGMA**2


def test_llama_kfac_and_ggn_equal_the_closed_form(x64):
    # Four query points, four parameters per task: K-FAC and the GGN are the exact Fisher
    # σ⁻² X̄ᵀX̄ for one output unit, so llama = maml − η log det(σ⁻² X̄ᵀX̄ + δI).
    support, query, params = linear_data(0, 5, 6, 4, 3)
    damping = 0.3
    values = objectives(linear_net, params, support, query,
                        {"kfac": KFAC(damping=damping), "ggn": GGN(damping=damping),
                         "kfac0": KFAC(damping=0.0), "ggn0": GGN(damping=0.0), "full": "full"})
    fisher = exact_fisher(query)
    logdet = np.linalg.slogdet(fisher + damping * np.eye(4))[1]
    logdet0 = np.linalg.slogdet(fisher)[1]
    for label, expected in (("kfac", logdet), ("ggn", logdet), ("kfac0", logdet0),
                            ("ggn0", logdet0), ("full", logdet0)):
        np.testing.assert_allclose(values["maml"] - values[label], expected, rtol=0, atol=1e-8,
                                   err_msg=label)


def test_kfac_curvature_is_the_fisher_in_phi_layout(x64):
    # Few points (n = 2 < p = 4): the compact (n × n) log det path, and the permutation
    # between Φ = [b, w] and K-FAC's [w; b] in solve and dense.
    support, query, params = linear_data(1, 3, 5, 2, 3)
    context = context_at(linear_net, params, support)
    damping = 0.2
    v = np.random.default_rng(2).normal(size=(3, 4))

    @jax.jit
    def pieces(phi):
        c = KFAC(damping=damping)(None, phi, context.observations(linear_net, query))
        return c.logdet(), c.dense(), c.solve(v), c.min_eigenvalue()

    logdet, dense, solved, min_eig = pieces(context.phi0 + 0.1)
    expected = exact_fisher(query) + damping * np.eye(4)
    np.testing.assert_allclose(dense, expected, atol=1e-10)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(expected)[1], atol=1e-8)
    np.testing.assert_allclose(solved, np.linalg.solve(expected, v[..., None])[..., 0],
                               atol=1e-8)
    np.testing.assert_allclose(min_eig, damping, atol=1e-10)  # rank 2 < 4


def test_ggn_equals_full_hessian_on_linear_gaussian_and_logistic(x64):
    # Linear-Gaussian: the Hessian of the query NLL is the GGN. Logistic (canonical link):
    # Xᵀ diag(p(1 − p)) X is both the Hessian and the GGN (Bernoulli path).
    support, query, params = linear_data(3, 4, 6, 7, 3)
    values = objectives(linear_net, params, support, query, {"ggn": GGN(damping=0.0),
                                                             "full": "full"}, maml=False)
    np.testing.assert_allclose(values["ggn"], values["full"], rtol=0, atol=1e-8)

    data = logistic.simulate(jax.random.PRNGKey(0), num_tasks=4, num_support=6, num_query=8)
    logistic_params = {"theta": jnp.array([0.3, -0.5, 1.0]), "tau": 0.8}
    values = objectives(logistic.model, logistic_params, data.support, data.query,
                        {"ggn": GGN(damping=0.0), "full": "full"}, maml=False)
    np.testing.assert_allclose(values["ggn"], values["full"], rtol=0, atol=1e-8)


@pytest.mark.parametrize(("n", "d"), [(3, 7), (7, 3)])
def test_ggn_dual_equals_primal(x64, n, d):
    rng = np.random.default_rng(n * 10 + d)
    w = rng.normal(size=(2, n, d))
    damping = 0.4
    curvature = GGNCurvature(jnp.asarray(w), damping)
    primal = np.einsum("tnd,tne->tde", w, w) + damping * np.eye(d)
    v = rng.normal(size=(2, d))

    @jax.jit
    def pieces(w):
        c = GGNCurvature(w, damping)
        return c.logdet(), c.solve(v), c.dense(), c.min_eigenvalue()

    logdet, solved, dense, min_eig = pieces(jnp.asarray(w))
    np.testing.assert_allclose(logdet, np.linalg.slogdet(primal)[1], atol=1e-10)
    np.testing.assert_allclose(solved, np.linalg.solve(primal, v[..., None])[..., 0], atol=1e-10)
    np.testing.assert_allclose(dense, primal, atol=1e-12)
    np.testing.assert_allclose(min_eig, np.linalg.eigvalsh(primal)[:, 0], atol=1e-10)
    # the log det formula of DESIGN.md, written out
    dual = np.einsum("tnd,tmd->tnm", w, w) + damping * np.eye(n)
    if n < d:
        np.testing.assert_allclose(logdet, (d - n) * np.log(damping)
                                   + np.linalg.slogdet(dual)[1], atol=1e-10)
    # samples: N(0, primal⁻¹)
    draws = jax.jit(lambda k: curvature.sample(k, 20000))(jax.random.PRNGKey(0))
    cov = np.einsum("std,ste->tde", draws, draws) / draws.shape[0]
    np.testing.assert_allclose(cov, np.linalg.inv(primal), atol=0.05)  # ~1e-2 Monte Carlo error


def test_task_site_outside_every_layer_is_an_error():
    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            w = numpyro.sample("w", dist.Normal(theta, 1.0).to_event(1))  # (tasks, 1, 2)
            shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))  # (tasks, 1)
            mean = dense_layer("out", x, w[:, 0, :, None])[..., 0] + shift
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(mean, 1.0), obs=y)

    support, query, _ = linear_data(4, 3, 4, 4, 2)
    marginal = hbm.meta_marginal(model, inner=hbm.TruncatedGD(1, 0.1), objective="llama",
                                 curvature="kfac")
    with pytest.raises(ValueError, match="needs every task site in a declared dense layer; "
                                         "site 'shift' is not"):
        log_density(marginal, (support, query), {}, {"theta": np.zeros(2)})


def test_scaled_layer_weights_and_laplace_are_errors():
    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            w = numpyro.sample("w", dist.Normal(theta, 1.0).to_event(1))
            mean = dense_layer("out", x, 2.0 * w[:, 0, :, None])[..., 0]
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(mean, 1.0), obs=y)

    support, query, _ = linear_data(5, 3, 4, 4, 2)
    marginal = hbm.meta_marginal(model, inner=hbm.TruncatedGD(1, 0.1), objective="llama",
                                 curvature="kfac")
    with pytest.raises(ValueError, match="'out': w is a transformed function"):
        log_density(marginal, (support, query), {}, {"theta": np.zeros(2)})
    for curvature in ("kfac", "ggn", GGN(damping=1.0)):
        with pytest.raises(ValueError, match="objective='laplace' needs the curvature of the "
                                             "log joint"):
            hbm.meta_marginal(model, inner=hbm.Newton(), curvature=curvature)
    with pytest.raises(ValueError, match="curvature must be one of"):
        hbm.meta_marginal(model, inner=hbm.Newton(), curvature="kfca")
    with pytest.raises(ValueError, match="damping must be a finite number"):
        KFAC(damping=-1.0)


def test_dense_layer_is_a_plain_layer_outside_the_handler():
    support, _, _ = linear_data(6, 2, 5, 0, 3)
    x = support["x"]
    w = np.random.default_rng(0).normal(size=(2, 3, 4))
    b = np.random.default_rng(1).normal(size=(2, 4))
    expected = np.einsum("tni,tio->tno", x, w) + b[:, None]
    np.testing.assert_allclose(dense_layer("l", x, w, b), expected, rtol=1e-6)
    np.testing.assert_allclose(dense_layer("l", x[0], w[0], b[0]), expected[0], rtol=1e-6)
    # Under handlers: a message of its own type, recorded by trace, zero offset.
    with handlers.trace() as tr:
        out = dense_layer("l", x, w, b)
    assert tr["l"]["type"] == LAYER
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Predictive and the potential energy NUTS differentiates run the model unchanged;
    # Predictive stores no layer site.

    @jax.jit
    def run(rng_key):
        draws = Predictive(linear_net, num_samples=3)(rng_key, x)
        latent = {name: value[0] for name, value in draws.items() if name != "y"}
        grads = jax.grad(lambda z: potential_energy(linear_net, (), support, z))(latent)
        return draws, grads

    draws, grads = run(jax.random.PRNGKey(1))
    assert set(draws) == {"theta_b", "theta_w", "b", "w", "y"}
    assert draws["y"].shape == (3, 2, 5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

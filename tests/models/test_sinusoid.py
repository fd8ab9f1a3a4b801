"""The sinusoid zoo model: data, declared layers, a short MAML fit, the held-out predictive."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from numpyro import handlers

import numpyro_hbmeta as hbm
from numpyro_hbmeta import curvature, nn
from numpyro_hbmeta.curvature import GGN
from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.models import get_model, sinusoid
from numpyro_hbmeta.nn.layers import LAYER
from numpyro_hbmeta.nn.vec import unvec_mlp


def test_load_data_shapes_truth_and_reproducibility():
    data = sinusoid.load_data(small=True, shots=5)
    for part in (data.support, data.query):
        assert part["x"].shape == (10, 5, 1) and part["y"].shape == (10, 5)
        assert float(jnp.max(jnp.abs(part["x"]))) <= 5.0
    amplitude, phase = data.truth["amplitude"], data.truth["phase"]
    assert bool(jnp.all((amplitude >= 0.1) & (amplitude <= 5.0)))
    assert bool(jnp.all((phase >= 0.0) & (phase <= math.pi)))
    expected = amplitude[:, None] * jnp.sin(data.query["x"][..., 0] - phase[:, None])
    np.testing.assert_allclose(data.query["y"], expected, rtol=1e-6)
    again = sinusoid.load_data(jax.random.PRNGKey(0), small=True, shots=5)
    np.testing.assert_array_equal(data.support["x"], again.support["x"])
    default = sinusoid.load_data()
    assert default.support["x"].shape == (25, 10, 1) and default.query["y"].shape == (25, 10)
    assert get_model("sinusoid") is sinusoid


def test_model_sites_and_declared_layers():
    data = sinusoid.load_data(small=True).support
    with handlers.trace() as trace:  # shapes and types only: trace abstractly (fast)
        jax.eval_shape(lambda: handlers.seed(sinusoid.model, 0)(**data))
    latent = {n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(sinusoid.GLOBALS) | set(sinusoid.TASK_SITES)
    assert trace["theta"]["value"].shape == (sinusoid.NUM_PARAMS,) == (1761,)
    assert trace["phi"]["value"].shape == (10, 1, 1761)
    assert any(is_task_frame(f) for f in trace["phi"]["cond_indep_stack"])
    assert [n for n, s in trace.items() if s["type"] == LAYER] == ["dense_0", "dense_1",
                                                                    "dense_2"]
    assert sinusoid.LAPLACE_EXACT is False


def test_network_is_the_ntk_parametrised_mlp():
    phi = jax.random.normal(jax.random.PRNGKey(0), (3, sinusoid.NUM_PARAMS))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 7, 1), minval=-5, maxval=5)
    params = unvec_mlp(phi, sinusoid.SIZES)
    for layer, width in enumerate(sinusoid.SIZES[:-1]):
        params[f"dense_{layer}"]["w"] = params[f"dense_{layer}"]["w"] / math.sqrt(width)
    expected = jax.vmap(nn.mlp)(params, x)[..., 0]
    np.testing.assert_allclose(sinusoid.network(phi, x), expected, rtol=1e-5, atol=1e-5)


def query_mse(params, data, inner):
    """Query MSE per predictor: φ̂ after the inner loop, θ itself, and 0."""
    marginal = hbm.meta_marginal(sinusoid.model, inner=inner, objective="maml")
    context = context_at(sinusoid.model, params, data.support)
    phi_hat, _ = jax.jit(lambda: marginal.solve(context, data.support))()
    x, y = data.query["x"], data.query["y"]
    return {"adapted": float(jnp.mean((sinusoid.network(phi_hat, x) - y) ** 2)),
            "theta": float(jnp.mean((sinusoid.network(context.phi0, x) - y) ** 2)),
            "zero": float(jnp.mean(y**2))}


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_short_maml_fit_adapts():
    # A CI-sized MetaEB run (float32): the inner loop must beat predicting with θ itself and
    # predicting 0 on the tasks' held-out query points; with no adaptation φ̂ = θ and it fails.
    data = sinusoid.load_data(small=True, shots=10)
    inner = hbm.TruncatedGD(sinusoid.FIT["maml_steps"], sinusoid.FIT["maml_step_size"])
    driver = hbm.MetaEB(sinusoid.model, inner=inner, objective="maml",
                        optimizer=optax.adam(sinusoid.FIT["eb_learning_rate"]))
    result = driver.run(jax.random.PRNGKey(2), 300, data.support, data.query,
                        init_params=sinusoid.init_params(jax.random.PRNGKey(3)),
                        progress_bar=False)
    assert np.mean(result.losses[-20:]) < 0.3 * result.losses[0]
    mse = query_mse(result.params, data, inner)
    assert mse["adapted"] < 0.5 * min(mse["theta"], mse["zero"]), mse


def hand_predictive(params, support, query, *, num_steps, step_size, damping):
    """MAML's plug-in and the linearised Laplace predictive log-likelihoods, computed densely
    with an independent MLP and scipy."""
    sigma, sizes = sinusoid.NOISE, sinusoid.SIZES

    def f(phi, x):  # one task, x: (points, 1)
        h = x
        start = 0
        for layer, (a, b) in enumerate(itertools.pairwise(sizes)):
            w_bar = phi[start:start + (a + 1) * b].reshape(a + 1, b)
            start += (a + 1) * b
            h = h @ w_bar[:-1] / math.sqrt(a) + w_bar[-1]
            h = jax.nn.relu(h) if layer < len(sizes) - 2 else h
        return h[:, 0]

    @jax.jit
    def adapt(theta, xs, ys, xq):
        phi = theta
        for _ in range(num_steps):
            phi = phi - step_size * jax.grad(
                lambda p: jnp.sum((f(p, xs) - ys) ** 2) / (2 * sigma**2))(phi)
        return phi, f(phi, xq), jax.jacrev(f)(phi, xs), jax.jacrev(f)(phi, xq)

    out = {"plug-in": [], "laplace": [], "laplace pointwise": []}
    for j in range(support["x"].shape[0]):
        xs, ys, xq, yq = support["x"][j], support["y"][j], query["x"][j], query["y"][j]
        phi, mean, js, jq = (np.asarray(v) for v in adapt(params["theta"], xs, ys, xq))
        out["plug-in"].append(scipy.stats.norm(mean, sigma).logpdf(np.asarray(yq)).sum())
        precision = js.T @ js / sigma**2 + damping * np.eye(phi.shape[0])
        cov = sigma**2 * np.eye(len(yq)) + jq @ np.linalg.solve(precision, jq.T)
        out["laplace"].append(scipy.stats.multivariate_normal(mean, cov).logpdf(np.asarray(yq)))
        out["laplace pointwise"].append(
            scipy.stats.norm(mean, np.sqrt(np.diag(cov))).logpdf(np.asarray(yq)))
    return {k: np.array(v) for k, v in out.items()}


def test_predictive_log_lik_matches_a_dense_hand_computation(x64):
    data = sinusoid.simulate(jax.random.PRNGKey(4), num_tasks=2, shots=3, num_query=4)
    params = sinusoid.init_params(jax.random.PRNGKey(5))
    inner = hbm.TruncatedGD(2, 0.01)
    damping = 0.5
    expected = hand_predictive(params, data.support, data.query, num_steps=2, step_size=0.01,
                               damping=damping)
    maml = sinusoid.predictive_log_lik(params, data.support, data.query, inner=inner)
    llama = sinusoid.predictive_log_lik(params, data.support, data.query, inner=inner,
                                        curvature=GGN(damping=damping))
    np.testing.assert_allclose(maml, expected["plug-in"], rtol=1e-9)
    np.testing.assert_allclose(llama, expected["laplace"], rtol=1e-9)
    assert not np.allclose(maml, llama)  # the posterior spread enters
    # The per-point marginals the experiment reports are those of the same Gaussian.
    predictive = sinusoid.laplace_predictive(params, data.support, data.query["x"], inner=inner,
                                             curvature=GGN(damping=damping))
    np.testing.assert_allclose(predictive.pointwise_log_lik(data.query["y"]),
                               expected["laplace pointwise"], rtol=1e-9)


@pytest.mark.slow  # dense Jacobians of a net in float64 (~20 s); the full suite runs it
@pytest.mark.parametrize("sizes, num_points", [((1, 4, 3, 1), 5), ((1, 2, 1), 9)])
def test_laplace_predictive_is_the_dense_glm_predictive_of_each_curvature(x64, sizes,
                                                                          num_points):
    # TaskPosterior's linearised predictive, in each curvature's own structure, against
    # J P⁻¹ Jᵀ from dense per-task Jacobians and dense P: fewer points than weights
    # (m VJPs and solves) and more (d JVPs of the posterior's square root).
    net = sinusoid.SinusoidNet(sizes)
    data = sinusoid.simulate(jax.random.PRNGKey(11), num_tasks=2, shots=3,
                             num_query=num_points, noise=net.noise)
    params = net.init_params(jax.random.PRNGKey(12))
    inner = hbm.TruncatedGD(2, 0.01)
    marginal = hbm.meta_marginal(net.model, inner=inner, objective="maml")
    context = context_at(net.model, params, data.support)
    phi_hat, _ = jax.jit(lambda: marginal.solve(context, data.support))()
    x = data.query["x"]

    @jax.jit
    def jacobian(inputs):  # dense per-task Jacobian of f at φ̂_j, (tasks, points, d)
        one_task = jax.jacrev(lambda phi, points: net.network(phi[None], points[None])[0])
        return jax.vmap(one_task)(phi_hat, inputs)

    support_jac = np.asarray(jacobian(data.support["x"])) / net.noise
    ggn = np.einsum("tnd,tne->tde", support_jac, support_jac)
    query_jac = np.asarray(jacobian(x))
    damping, d = 0.5, net.num_params
    loss = marginal.inner_loss(context, data.support)
    observations = context.observations(net.model, data.support)
    precisions = {
        "ggn": (GGN(damping=damping), ggn + damping * np.eye(d)),
        "diag": (sinusoid.DiagGGN(damping=damping),
                 np.stack([np.diag(np.diag(g) + damping) for g in ggn])),
        "kfac": (hbm.KFAC(damping=damping),
                 np.asarray(jax.jit(lambda: hbm.KFAC(damping=damping)(
                     loss, phi_hat, observations).dense())())),
    }
    mean = net.network(phi_hat, x)
    num_samples = 4000
    for name, (builder, dense) in precisions.items():
        expected = np.einsum("tnd,tde,tme->tnm", query_jac, np.linalg.inv(dense), query_jac)
        got = sinusoid.laplace_predictive(params, data.support, x, inner=inner,
                                          curvature=builder, net=net,
                                          rng_key=jax.random.PRNGKey(13),
                                          num_samples=num_samples)
        np.testing.assert_allclose(got.mean, mean, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got.function_cov, expected, rtol=1e-8, atol=1e-12,
                                   err_msg=name)
        # The draws: f(φ̂) + J S z has covariance J P⁻¹ Jᵀ; 5 standard errors of each
        # entry of the sample covariance, (Σ_ii Σ_jj + Σ_ij²) / S.
        centred = np.asarray(got.function_draws) - np.asarray(mean)
        sample_cov = np.einsum("stn,stm->tnm", centred, centred) / num_samples
        variance = np.diagonal(expected, axis1=-2, axis2=-1)
        error = np.sqrt((variance[..., :, None] * variance[..., None, :] + expected**2)
                        / num_samples)
        np.testing.assert_array_less(np.abs(sample_cov - expected), 5 * error + 1e-12,
                                     err_msg=name)


def test_diag_ggn_is_the_hessian_diagonal_of_a_relu_net(x64):
    # f is piecewise linear in each single weight of a ReLU net, so the Hessian diagonal of
    # the squared loss is the GGN diagonal (away from kinks, which random inputs avoid).
    net = sinusoid.SinusoidNet((1, 6, 5, 1))
    data = sinusoid.simulate(jax.random.PRNGKey(6), num_tasks=3, shots=4, num_query=2)
    params = net.init_params(jax.random.PRNGKey(7))
    marginal = hbm.meta_marginal(net.model, inner=hbm.TruncatedGD(1, 0.01), objective="maml")
    context = context_at(net.model, params, data.support)
    loss = marginal.inner_loss(context, data.support)
    phi = context.phi0 + 0.3 * jax.random.normal(jax.random.PRNGKey(8), context.phi0.shape)
    damping = 0.7
    observations = context.observations(net.model, data.support)

    @jax.jit  # one compile instead of an eager run of every operation
    def diagonals(phi):
        return (sinusoid.DiagGGN(damping=damping)(loss, phi, observations).diagonal,
                curvature.diag(loss, phi).diagonal)

    got, exact = diagonals(phi)
    np.testing.assert_allclose(got, exact + damping, rtol=1e-9, atol=1e-9)
    assert float(jnp.min(exact)) >= 0.0


def linear_posterior(theta, tau, noise, x, y, x_new):
    """Closed-form posterior predictive of f(x) = w x + b with (w, b) ~ N(θ, τ²I)."""
    design = np.stack([x, np.ones_like(x)], -1)  # (points, 2)
    precision = np.eye(2) / tau**2 + design.T @ design / noise**2
    cov = np.linalg.inv(precision)
    mean = cov @ (theta / tau**2 + design.T @ y / noise**2)
    new = np.stack([x_new, np.ones_like(x_new)], -1)
    return new @ mean, np.sqrt(np.einsum("ni,ij,nj->n", new, cov, new))


@pytest.mark.slow
def test_nuts_and_laplace_on_a_linear_net_match_the_closed_form(x64):
    # A 1-1 "network" is linear in its weights: the task posterior and its predictive are
    # Gaussian in closed form. The Laplace predictive (exact MAP by Newton, exact GGN = the
    # Hessian, damping 1/τ² = the prior) equals it to roundoff; NUTS matches it within Monte
    # Carlo error: 5 standard errors, using the draws' effective sample size.
    tau = 0.8
    net = sinusoid.SinusoidNet((1, 1), tau=tau)
    data = sinusoid.simulate(jax.random.PRNGKey(9), num_tasks=3, shots=4, num_query=6,
                             noise=net.noise)
    theta = jnp.array([0.5, -0.3])
    x_new = data.query["x"]
    expected = [linear_posterior(np.asarray(theta), tau, net.noise,
                                 np.asarray(data.support["x"][j, :, 0]),
                                 np.asarray(data.support["y"][j]), np.asarray(x_new[j, :, 0]))
                for j in range(3)]
    mean = np.stack([e[0] for e in expected])
    sd = np.stack([e[1] for e in expected])

    laplace = sinusoid.laplace_predictive({"theta": theta}, data.support, x_new,
                                          inner=hbm.Newton(), curvature=GGN(damping=tau**-2),
                                          net=net)
    np.testing.assert_allclose(laplace.mean, mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(laplace.function_sd, sd, rtol=1e-8)

    reference = sinusoid.nuts_task_posterior(net, theta, data.support, jax.random.PRNGKey(10),
                                             num_warmup=500, num_samples=1500, num_chains=2)
    assert reference.divergences == 0 and reference.max_r_hat < 1.02
    nuts = sinusoid.nuts_predictive(net, reference.phi, x_new)
    ess = reference.min_ess
    np.testing.assert_array_less(np.abs(nuts.mean - mean), 5 * sd / np.sqrt(ess))
    np.testing.assert_array_less(np.abs(nuts.function_sd / sd - 1), 5 / np.sqrt(2 * ess))
    # The mixture predictive of y against N(mean, sd² + σ²): log density and 90% interval,
    # at y typical of that predictive (far in its tails a Monte Carlo mixture density has a
    # large relative error, and a sinusoid's query points are far from a line's predictive).
    y_sd = np.sqrt(sd**2 + net.noise**2)
    y = mean + y_sd * np.random.default_rng(0).standard_normal(mean.shape)
    exact_lpd = scipy.stats.norm(mean, y_sd).logpdf(y)
    # Tolerance: the 5-standard-error bounds on the mean (Δμ) and on the variance
    # (Δv = 2 sd Δsd) propagated through log N(y; μ, v) to first order, plus 0.005.
    var = y_sd**2
    d_mean, d_var = 5 * sd / np.sqrt(ess), 2 * sd * 5 * sd / np.sqrt(2 * ess)
    tol = (np.abs(y - mean) / var * d_mean
           + 0.5 * np.abs((y - mean) ** 2 / var**2 - 1 / var) * d_var + 0.005)
    np.testing.assert_array_less(np.abs(nuts.pointwise_log_lik(y) - exact_lpd), tol)
    low, high = nuts.interval(0.9)
    z = scipy.stats.norm.ppf(0.95)
    bound = d_mean + z * d_var / (2 * y_sd) + 0.005  # the same bounds on μ ± z·√v
    np.testing.assert_array_less(np.abs(low - (mean - z * y_sd)), bound)
    np.testing.assert_array_less(np.abs(high - (mean + z * y_sd)), bound)

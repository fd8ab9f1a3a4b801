"""The few-shot zoo model: sites and layers, data sources, a short MAML fit, K-FAC coverage."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers

import numpyro_hbmeta as hbm
from numpyro_hbmeta import nn
from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.models import fewshot, get_model
from numpyro_hbmeta.nn import episodes
from numpyro_hbmeta.nn.layers import LAYER
from numpyro_hbmeta.nn.vec import unvec_mlp

SMALL_HIDDEN = (32,)


@pytest.fixture(scope="module")
def data():
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        return fewshot.load_omniglot(None, small=True)


def test_zoo_entry_sizes_and_cached_models():
    assert get_model("fewshot") is fewshot and fewshot.COMPARE_METHODS == ("maml", "llama")
    assert fewshot.sizes(5) == (196, 128, 64, 5) and fewshot.num_params(5) == 33797
    assert fewshot.make_model(20) is fewshot.make_model(20)  # one function: one compile
    assert fewshot.make_model(20).sizes[-1] == 20 and fewshot.model.n_way == 5


def test_model_sites_and_declared_layers():
    model = fewshot.make_model(5)
    x = jnp.zeros((3, 5, 196))
    y = jnp.zeros((3, 5), jnp.int32)
    with handlers.trace() as trace:  # shapes and types only
        jax.eval_shape(lambda: handlers.seed(model, 0)(x, y))
    latent = {n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(fewshot.GLOBALS) | set(fewshot.TASK_SITES)
    assert trace["theta"]["value"].shape == (33797,)
    assert trace["phi"]["value"].shape == (3, 1, 33797)
    assert any(is_task_frame(f) for f in trace["phi"]["cond_indep_stack"])
    assert isinstance(trace["y"]["fn"], dist.CategoricalLogits)
    assert trace["y"]["fn"].batch_shape == (3, 5)
    assert [n for n, s in trace.items() if s["type"] == LAYER] == ["dense_0", "dense_1",
                                                                    "dense_2"]


def test_network_is_the_standard_mlp_and_init_is_lecun():
    sizes = fewshot.sizes(5, hidden=SMALL_HIDDEN)
    phi = jax.random.normal(jax.random.PRNGKey(0), (2, fewshot.num_params(5, hidden=SMALL_HIDDEN)))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 7, 196))
    expected = jax.vmap(nn.mlp)(unvec_mlp(phi, sizes), x)
    np.testing.assert_allclose(fewshot.network(phi, x, sizes), expected, rtol=1e-5, atol=1e-5)
    theta = fewshot.init_params(jax.random.PRNGKey(2), 5)["theta"]
    w0 = unvec_mlp(theta, fewshot.sizes(5))["dense_0"]
    assert float(jnp.abs(w0["b"]).max()) == 0.0
    assert abs(float(jnp.std(w0["w"])) * np.sqrt(196) - 1.0) < 0.05  # N(0, 1/fan_in)


def test_load_data_is_loudly_synthetic_without_a_path(monkeypatch):
    monkeypatch.delenv(fewshot.ENV_VAR, raising=False)
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        task_data = fewshot.load_data(small=True)
    assert all(label.startswith("SYNTHETIC") for label in task_data.task_labels)
    assert task_data.support["x"].shape == (10, 5, 196)
    assert task_data.query["x"].shape == (10, 25, 196)
    assert task_data.truth is None
    # class-major labels 0..N−1; which dataset class is behind each label changes per episode
    np.testing.assert_array_equal(task_data.support["y"][0], np.arange(5))


def test_a_given_path_or_env_var_is_real_data_and_zips_merge(tmp_path, monkeypatch):
    first = episodes.make_synthetic_omniglot(tmp_path / "a.zip", alphabets=2, characters=5,
                                             drawers=8, seed=1)
    second = episodes.make_synthetic_omniglot(tmp_path / "b.zip", alphabets=2, characters=5,
                                              drawers=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no synthetic-fallback warning with a path
        one = fewshot.load_omniglot(first)
        monkeypatch.setenv(fewshot.ENV_VAR, f"{first}:{second}")
        both = fewshot.load_omniglot()
    assert not one.synthetic and one.source == str(first)
    assert both.source == f"{first} + {second}"
    # the same alphabet/character names in both zips are kept once (Omniglot's small1/small2
    # share Greek and Latin)
    assert both.train.characters == one.train.characters
    assert set(one.train.characters).isdisjoint(one.test.characters)


@pytest.mark.slow
def test_short_maml_fit_adapts_on_synthetic_episodes(data):
    # 5-way 1-shot: labels are permuted per episode, so without adaptation (φ̂ = θ) any θ is
    # at chance (0.2 ± sampling noise); after a short MAML fit one inner step must classify
    # held-out-class episodes far above chance. Fails if the inner loop does nothing.
    model = fewshot.make_model(5, hidden=SMALL_HIDDEN)
    inner = hbm.TruncatedGD(1, 0.4)
    driver = hbm.MetaEB(model, inner=inner, objective="maml", optimizer=optax.adam(3e-3))
    fit = fewshot.meta_train(driver, jax.random.PRNGKey(0), data.train, 40, n_way=5, k_shot=1,
                             k_query=3, tasks_per_batch=8, progress_bar=False)
    assert fit.losses.shape == (40,) and np.all(np.isfinite(fit.losses))
    assert fit.losses[-10:].mean() < fit.losses[:10].mean()
    support, query = fewshot.sample_tasks(jax.random.PRNGKey(1), data.test, num_tasks=60,
                                          n_way=5, k_shot=1, k_query=3)
    adapted = fewshot.Evaluator(model, inner).accuracy(fit.params, support, query)
    frozen = fewshot.Evaluator(model, hbm.TruncatedGD(0, 0.4)).accuracy(fit.params, support,
                                                                         query)
    assert adapted.shape == (60,)
    # 900 query predictions: chance ± 3 sd is 0.2 ± 0.04
    assert frozen.mean() < 0.27, frozen.mean()
    assert adapted.mean() > 0.5, adapted.mean()


def small_setting(split, seed: int, num_tasks: int):
    """A 5-way 1-shot model on SMALL_HIDDEN, ``num_tasks`` episodes of ``split`` with 2
    queries per class, and θ from the prior (keys ``seed`` and ``seed + 1``)."""
    model = fewshot.make_model(5, hidden=SMALL_HIDDEN)
    support, query = fewshot.sample_tasks(jax.random.PRNGKey(seed), split, num_tasks=num_tasks,
                                          n_way=5, k_shot=1, k_query=2)
    params = {"theta": fewshot.init_params(jax.random.PRNGKey(seed + 1), 5,
                                           hidden=SMALL_HIDDEN)["theta"]}
    return model, support, query, params


def test_llama_kfac_sees_every_layer_and_adds_a_finite_penalty(data):
    model, support, query, params = small_setting(data.train, 2, num_tasks=3)
    inner = hbm.TruncatedGD(1, 0.4)
    losses = {}
    for objective, eta in (("maml", 1e-6), ("llama", 1e-6), ("llama", 1.0)):
        driver = hbm.MetaEB(model, inner=inner, objective=objective, curvature="kfac", eta=eta)
        losses[objective, eta] = float(jax.jit(driver.loss)(params, support, query))
    assert all(np.isfinite(v) for v in losses.values())
    penalty = losses["llama", 1.0] - losses["maml", 1e-6]  # Σ_j log det Ĥ_j
    assert penalty != 0.0
    np.testing.assert_allclose(losses["llama", 1e-6] - losses["maml", 1e-6], 1e-6 * penalty,
                               rtol=1e-2, atol=1e-3)


def test_kfac_refuses_task_parameters_in_a_convolution():
    # A convolution K-FAC cannot see (plain nn.conv2d, not conv2d_layer) whose kernel is a
    # task parameter must raise a clear error, not fall back silently.
    def conv_model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3 * 3 * 1 * 2]).to_event(1))
        head = numpyro.sample("head", dist.Normal(0, 1).expand([2 * 7 * 7 * 5]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, 0.1).to_event(1))
            kernels = phi[:, 0].reshape(-1, 3, 3, 1, 2)
            maps = jax.vmap(lambda k, im: nn.conv2d({"w": k}, im))(kernels, x)
            logits = maps.reshape(*maps.shape[:2], -1) @ head.reshape(-1, 5)
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Categorical(logits=logits), obs=y)

    x = jnp.ones((2, 5, 7, 7, 1))
    y = jnp.zeros((2, 5), jnp.int32)
    driver = hbm.MetaEB(conv_model, inner=hbm.TruncatedGD(1, 0.1), objective="llama",
                        curvature="kfac")
    params = {"theta": jnp.zeros(18), "head": jnp.zeros(490)}
    with pytest.raises(ValueError, match=r"not in a declared dense layer|declares no hbm"):
        driver.loss(params, {"x": x, "y": y}, {"x": x, "y": y})


def test_laplace_predictive_is_a_distribution_and_reduces_to_plug_in(data):
    model, support, query, params = small_setting(data.test, 4, num_tasks=4)
    evaluator = fewshot.Evaluator(model, hbm.TruncatedGD(1, 0.4))
    plug_in = evaluator.probabilities(params, support, query)
    spread = evaluator.probabilities(params, support, query, curvature=hbm.KFAC(damping=1.0),
                                     num_samples=16)
    tight = evaluator.probabilities(params, support, query, curvature=hbm.KFAC(damping=1e8),
                                    num_samples=4)
    assert plug_in.shape == spread.shape == (4, 10, 5)
    np.testing.assert_allclose(spread.sum(-1), 1.0, rtol=1e-5)
    # damping δ is the posterior precision floor: δ = 1e8 gives draws of sd ≤ 1e-4 around φ̂
    np.testing.assert_allclose(tight, plug_in, atol=1e-3)
    assert np.abs(spread - plug_in).max() > 1e-2  # δ = 1: the spread matters


def test_mean_interval_is_the_normal_95_percent_half_width():
    values = np.array([0.2, 0.4, 0.6, 0.8])
    mean, half = fewshot.mean_interval(values)
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(1.959964 * np.std(values, ddof=1) / 2)

"""Bad input gets a clear error naming the argument, site or task; never a raw JAX/NumPyro one.

Issue 11: each case below is something a careful user tries. Every case asserts the exception
type, that the message names what was wrong (argument, site, task, value), and that the error
is raised by this library's own code (the last frame of the traceback is in numpyro_hbmeta),
not by JAX or NumPyro deep inside a trace.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.optim
import optax
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta import validate
from numpyro_hbmeta.infer import baselines
from numpyro_hbmeta.models import linear

KEY = jax.random.PRNGKey(0)
DATA = linear.simulate(KEY, num_tasks=3, num_support=4, num_query=3)
S, Q = DATA.support, DATA.query  # x: (3, 4, 2), y: (3, 4); query (3, 3, ...)
NEWTON = hbm.Newton(max_steps=5)
GD = hbm.TruncatedGD(1, 0.01)


# -- models a user might write ----------------------------------------------------------------
def no_plate_model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with numpyro.plate("tasks", x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), 1.0), obs=y)


def discrete_model(x, y=None):
    p = numpyro.sample("p", dist.Beta(1.0, 1.0))
    with hbm.tasks(x.shape[0], dim=-2):
        numpyro.sample("z", dist.Bernoulli(p).expand([1, 2]).to_event(1))


def wrong_batch_model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        numpyro.sample("phi", dist.Normal(theta, 1.0).expand([5, 1, 2]).to_event(1))


def no_task_latent_model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2), numpyro.plate("points", x.shape[1], dim=-1):
        numpyro.sample("y", dist.Normal(jnp.sum(x * theta, -1), 1.0), obs=y)


def coupled_model(x, y=None):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        shared = jnp.mean(phi, axis=0, keepdims=True)  # every task sees every other task
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jnp.sum(x * (phi + shared), -1), 1.0), obs=y)


def four_points_model(x, y=None):
    """Hard-codes 4 points per task: a query with 3 points does not fit it."""
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with numpyro.plate("points", 4, dim=-1):
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), 1.0), obs=y)


def log_scale_model(x, y=None):
    """Observation scale exp(s): finite for moderate s, inf (log density -inf) for s = 1e3."""
    s = numpyro.sample("s", dist.Normal(0.0, 1e3))
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), jnp.exp(s)), obs=y)


# -- helpers -----------------------------------------------------------------------------------
def with_value(data, key, index, value):
    return dict(data, **{key: data[key].at[index].set(value)})


def check(support, query=None, *, model=linear.model, objective="laplace", inner=NEWTON,
          **kwargs):
    marginal = hbm.meta_marginal(model, inner=inner, objective=objective)
    return marginal.check(support, query, **kwargs)


def eb_run(num_steps=2, support=None, query=None, *, optimizer=None, **kwargs):
    driver = hbm.MetaEB(linear.model, inner=NEWTON, objective="laplace", optimizer=optimizer)
    return driver.run(KEY, num_steps, DATA.all_data() if support is None else support, query,
                      progress_bar=False, **kwargs)


def nuts_on_marginal(model):
    marginal = hbm.meta_marginal(model, inner=NEWTON)
    MCMC(NUTS(marginal), num_warmup=2, num_samples=2, progress_bar=False).run(KEY, S)


J = S["x"].shape[0]

CASES = [
    # data: values
    ("nan_in_support_y", lambda: check(with_value(S, "y", (1, 2), jnp.nan)),
     ValueError, r"support\['y'\] \(observed site 'y'\) holds NaN or inf at task 1 point 2"),
    ("inf_in_query_y", lambda: check(S, with_value(Q, "y", (0, 1), jnp.inf), objective="maml",
                                     inner=GD),
     ValueError, r"query\['y'\] \(observed site 'y'\) holds NaN or inf at task 0 point 1"),
    ("nan_in_support_x", lambda: check(with_value(S, "x", (2, 3, 1), jnp.nan)),
     ValueError, r"support\['x'\] holds NaN or inf at task 2, index \(3, 1\)"),
    ("string_data", lambda: check(dict(S, x="abc")),
     TypeError, r"support\['x'\] is the string 'abc'"),
    ("ragged_nested_list", lambda: check(dict(S, x=[[1.0, 2.0], [3.0]])),
     TypeError, r"support\['x'\] is a ragged nested list"),
    ("object_data", lambda: check(dict(S, x=object())),
     TypeError, r"support\['x'\] is <object object"),
    ("non_numeric_array", lambda: check(dict(S, x=np.array([["a", "b"]] * 3))),
     TypeError, r"support\['x'\] has dtype <U1"),
    ("data_not_a_dict", lambda: check([S["x"], S["y"]]),
     TypeError, r"support must be a dict of the model.s keyword arguments.*got a list object"),
    ("zero_tasks", lambda: check({"x": S["x"][:0], "y": S["y"][:0]}),
     ValueError, r"support\['x'\] holds no tasks: its shape is \(0, 4, 2\)"),
    ("zero_points", lambda: check({"x": S["x"][:, :0], "y": S["y"][:, :0]}),
     ValueError, r"support\['x'\] holds no points: its shape is \(3, 0, 2\)"),
    ("zero_query_points", lambda: check(S, {"x": Q["x"][:, :0], "y": Q["y"][:, :0]},
                                        objective="maml", inner=GD),
     ValueError, r"query\['x'\] holds no points"),
    # data: structure
    ("unknown_data_key", lambda: check(dict(S, z=S["y"])),
     ValueError, r"support does not match the model's signature.*'z'"),
    ("missing_data_key", lambda: check({"y": S["y"]}),
     ValueError, r"support does not match.*missing model argument\(s\) \['x'\]"),
    ("wrong_task_count_in_support", lambda: check(dict(S, y=S["y"][:2])),
     ValueError, r"support\['y'\] has shape \(2, 4\).*3 tasks"),
    ("support_query_task_counts", lambda: check(S, {k: v[:2] for k, v in Q.items()},
                                                objective="maml", inner=GD),
     ValueError, r"support has 3 tasks but query has 2"),
    ("query_points_model_forbids", lambda: check(S, Q, model=four_points_model,
                                                 objective="maml", inner=GD),
     ValueError, r"the model failed on query \{'x': \(3, 3, 2\), 'y': \(3, 3\)\}"),
    # models
    ("no_tasks_plate", lambda: check(S, model=no_plate_model),
     ValueError, r"the model has no tasks plate"),
    ("discrete_task_site", lambda: check(S, model=discrete_model),
     ValueError, r"task site 'z' is discrete \(Bernoulli"),
    ("task_site_wrong_batch_shape", lambda: check(S, model=wrong_batch_model),
     ValueError, r"site 'phi' inside tasks plate 'tasks': expected 3 tasks at batch dim -2, "
                 r"got batch shape \(5, 1\)"),
    ("no_latent_task_site", lambda: check(S, model=no_task_latent_model),
     ValueError, r"tasks plate 'tasks' holds no latent task site"),
    ("coupled_tasks", lambda: check(S, model=coupled_model),
     ValueError, r"couples tasks inside the tasks plate: the log density of task\(s\) \[0"),
    ("coupled_tasks_under_nuts", lambda: nuts_on_marginal(coupled_model),
     ValueError, r"couples tasks inside the tasks plate"),
    ("coupled_tasks_run_nuts_marginal",
     lambda: baselines.run_nuts_marginal(coupled_model, S, KEY, num_warmup=2, num_samples=2,
                                         num_chains=1, progress_bar=False),
     ValueError, r"couples tasks inside the tasks plate"),
    ("non_finite_probe_point", lambda: check(S, model=log_scale_model,
                                             params={"s": 1e3, "theta": jnp.zeros(2)}),
     ValueError, r"log density of task\(s\) \[0, 1, 2\].*not finite at the probe point "
                 r"θ = \{s: 1000"),
    # handler arguments
    ("unknown_objective", lambda: hbm.meta_marginal(linear.model, inner=NEWTON,
                                                    objective="elbo"),
     ValueError, r"objective must be one of \('maml', 'llama', 'laplace'\), got 'elbo'"),
    ("laplace_with_query", lambda: check(S, Q),
     ValueError, r"objective='laplace' is the evidence of the support data, but a query"),
    ("maml_without_query", lambda: check(S, objective="maml", inner=GD),
     ValueError, r"objective='maml' scores the query set"),
    ("unknown_curvature", lambda: hbm.meta_marginal(linear.model, inner=NEWTON,
                                                    curvature="bfgs"),
     ValueError, r"curvature must be one of .* got 'bfgs'"),
    ("kfac_with_laplace", lambda: hbm.meta_marginal(linear.model, inner=NEWTON,
                                                    curvature="kfac"),
     ValueError, r"curvature='kfac'.*objective='laplace'"),
    ("negative_eta", lambda: hbm.meta_marginal(linear.model, inner=GD, objective="llama",
                                               eta=-1.0),
     ValueError, r"eta must be a finite non-negative number, got -1.0"),
    ("nan_eta", lambda: hbm.meta_marginal(linear.model, inner=GD, objective="llama",
                                          eta=math.nan),
     ValueError, r"eta must be a finite non-negative number, got nan"),
    ("inner_as_string", lambda: hbm.meta_marginal(linear.model, inner="newton"),
     TypeError, r"inner must be TruncatedGD\(...\) or Newton\(...\), got 'newton'"),
    ("gd_half_a_step", lambda: hbm.TruncatedGD(0.5, 0.1),
     TypeError, r"TruncatedGD: num_steps must be an integer, got 0.5 \(float\)"),
    ("gd_step_size_zero", lambda: hbm.TruncatedGD(1, 0.0),
     ValueError, r"TruncatedGD: step_size must be a finite positive number, got 0.0"),
    ("gd_step_size_negative", lambda: hbm.TruncatedGD(1, -0.1),
     ValueError, r"TruncatedGD: step_size must be a finite positive number, got -0.1"),
    ("gd_step_size_nan", lambda: hbm.TruncatedGD(1, math.nan),
     ValueError, r"TruncatedGD: step_size must be a finite positive number, got nan"),
    ("gd_step_size_inf", lambda: hbm.meta_marginal(linear.model, objective="maml",
                                                   inner=hbm.TruncatedGD(1, math.inf)),
     ValueError, r"step_size must be a finite positive number, got inf"),
    ("gd_unknown_prior", lambda: hbm.TruncatedGD(1, 0.1, prior="flat"),
     ValueError, r"prior must be 'implicit' or 'explicit', got 'flat'"),
    ("newton_max_steps_zero", lambda: hbm.Newton(max_steps=0),
     ValueError, r"Newton: max_steps must be a positive integer \(at least 1\), got 0"),
    ("newton_tol_zero", lambda: hbm.Newton(tol=0.0),
     ValueError, r"Newton: tol must be a finite positive number, got 0.0"),
    ("newton_tol_negative", lambda: hbm.Newton(tol=-1e-6),
     ValueError, r"Newton: tol must be a finite positive number, got -1e-06"),
    # start values
    ("params_unknown_name", lambda: check(S, params={"bogus": 1.0}),
     ValueError, r"params has \['bogus'\], which are not global sites.*'theta'"),
    ("params_wrong_shape", lambda: check(S, params={"theta": jnp.zeros(3)}),
     ValueError, r"params\['theta'\] has shape \(3,\), but global site 'theta' has shape "
                 r"\(2,\)"),
    ("params_out_of_support", lambda: check(S, params={"tau": -1.0}),
     ValueError, r"params\['tau'\] = -1.* is outside the support of global site 'tau'"),
    ("params_not_a_number", lambda: check(S, params={"tau": "one"}),
     TypeError, r"params\['tau'\] must be a number or an array, got 'one'"),
    ("init_params_unknown_name", lambda: eb_run(init_params={"bogus": 1.0}),
     ValueError, r"params has \['bogus'\], which are not global sites"),
    ("init_params_wrong_shape", lambda: eb_run(init_params={"theta": jnp.zeros(3)}),
     ValueError, r"params\['theta'\] has shape \(3,\)"),
    ("init_params_negative_scale", lambda: eb_run(init_params={"tau": -1.0}),
     ValueError, r"params\['tau'\] = -1.* is outside the support"),
    # MetaEB.run arguments
    ("num_steps_zero", lambda: eb_run(0),
     ValueError, r"num_steps must be a positive integer \(at least 1\), got 0"),
    ("num_steps_negative", lambda: eb_run(-5),
     ValueError, r"num_steps must be a positive integer \(at least 1\), got -5"),
    ("num_steps_float", lambda: eb_run(2.5),
     TypeError, r"num_steps must be an integer, got 2.5 \(float\)"),
    ("num_steps_integral_float", lambda: eb_run(3.0),
     TypeError, r"num_steps must be an integer, got 3.0 \(float\)"),
    ("num_steps_bool", lambda: eb_run(True),
     TypeError, r"num_steps must be an integer, got True \(bool\)"),
    ("num_steps_string", lambda: eb_run("10"),
     TypeError, r"num_steps must be an integer, got '10' \(str\)"),
    ("task_batch_size_float", lambda: eb_run(task_batch_size=2.5),
     TypeError, r"task_batch_size must be an integer, got 2.5 \(float\) \(the data hold 3"),
    ("task_batch_size_zero", lambda: eb_run(task_batch_size=0),
     ValueError, r"task_batch_size must be a positive integer.*got 0 \(the data hold 3 tasks"),
    ("task_batch_size_too_large", lambda: eb_run(task_batch_size=J + 1),
     ValueError, r"task_batch_size must be at most the number of tasks, 3, got 4"),
    ("optimizer_string", lambda: eb_run(optimizer="adam"),
     TypeError, r"optimizer must be an optax GradientTransformation, e.g. optax.adam\(1e-2\); "
                r"got the string 'adam'"),
    ("optimizer_numpyro_optim", lambda: eb_run(optimizer=numpyro.optim.Adam(0.01)),
     TypeError, r"got numpyro.optim.Adam.*optax.adam\(step_size\)"),
    ("optimizer_number", lambda: eb_run(optimizer=42),
     TypeError, r"optimizer must be an optax GradientTransformation.*got 42 \(int\)"),
    ("optimizer_uncalled_factory", lambda: eb_run(optimizer=optax.adam),
     TypeError, r"got the function optax.adam, not called"),
    ("eb_string_data", lambda: eb_run(support=dict(S, y="y")),
     TypeError, r"support\['y'\] is the string 'y'"),
    ("eb_nan_data", lambda: eb_run(support=with_value(S, "y", (2, 0), jnp.nan)),
     ValueError, r"support\['y'\] \(observed site 'y'\) holds NaN or inf at task 2 point 0"),
    ("eb_data_not_a_dict", lambda: eb_run(support=(S["x"], S["y"])),
     TypeError, r"support must be a dict"),
    # baselines
    ("svi_num_steps_zero", lambda: baselines.run_svi(linear.model, S, KEY, num_steps=0),
     ValueError, r"num_steps must be a positive integer \(at least 1\), got 0"),
    ("svi_learning_rate_negative",
     lambda: baselines.run_svi(linear.model, S, KEY, num_steps=2, learning_rate=-0.1),
     ValueError, r"learning_rate must be a finite positive number, got -0.1"),
    ("svi_unknown_guide", lambda: baselines.run_svi(linear.model, S, KEY, guide="flow"),
     ValueError, r"guide must be one of \('normal', 'lowrank', 'delta'\), got 'flow'"),
    ("nuts_num_samples_zero", lambda: baselines.run_nuts(linear.model, S, KEY, num_samples=0),
     ValueError, r"num_samples must be a positive integer \(at least 1\), got 0"),
    ("nuts_num_warmup_negative",
     lambda: baselines.run_nuts(linear.model, S, KEY, num_warmup=-1),
     ValueError, r"num_warmup must be a non-negative integer, got -1"),
    ("nuts_zero_tasks", lambda: baselines.run_nuts(linear.model, {"x": S["x"][:0],
                                                                  "y": S["y"][:0]}, KEY),
     ValueError, r"data\['x'\] holds no tasks"),
    ("validate_positive_int_direct", lambda: validate.positive_int(np.float32(4), "num_samples"),
     TypeError, r"num_samples must be an integer, got np.float32\(4.0\) \(float32\)"),
]


@pytest.mark.parametrize("case, error, match", [pytest.param(c, e, m, id=i)
                                                for i, c, e, m in CASES])
def test_bad_input_gets_a_clear_error(case, error, match):
    with pytest.raises(error, match=match) as excinfo:
        case()
    raised_in = str(excinfo.traceback[-1].path)
    assert "numpyro_hbmeta" in raised_in, f"raised inside {raised_in}: {excinfo.value!r}"


def test_enough_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# -- what must keep working --------------------------------------------------------------------
def ragged_model(x, y=None, mask=None):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    with hbm.tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1), numpyro.handlers.mask(mask=mask):
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), 1.0), obs=y)


def test_masked_observations_may_hold_nan_but_covariates_may_not():
    mask = jnp.ones(S["y"].shape, bool).at[0, 3].set(False)
    marginal = hbm.meta_marginal(ragged_model, inner=NEWTON)
    padded = dict(with_value(S, "y", (0, 3), jnp.nan), mask=mask)
    marginal.check(padded)
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: log_density(marginal, (padded,), {}, p)[0]))({"theta": jnp.zeros(2)})
    assert np.isfinite(value) and np.all(np.isfinite(grads["theta"]))
    # The same objective and gradient as zero padding, exactly: the mask removes the value.
    zero = dict(with_value(S, "y", (0, 3), 0.0), mask=mask)
    value0, grads0 = jax.jit(jax.value_and_grad(
        lambda p: log_density(marginal, (zero,), {}, p)[0]))({"theta": jnp.zeros(2)})
    np.testing.assert_array_equal(value, value0)
    np.testing.assert_array_equal(grads["theta"], grads0["theta"])
    with pytest.raises(ValueError, match=r"support\['y'\].*task 1 point 3"):
        marginal.check(dict(with_value(padded, "y", (1, 3), jnp.nan)))
    with pytest.raises(ValueError, match=r"support\['x'\] holds NaN.*even where masked"):
        marginal.check(dict(with_value(padded, "x", (0, 3, 0), jnp.nan)))


def test_integer_prior_mean_works():
    def model(y=None):
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with hbm.tasks(y.shape[0], dim=-2):
            a = numpyro.sample("a", dist.Normal(0, tau))  # an integer mean
            with numpyro.plate("points", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(a, 1.0), obs=y)

    marginal = hbm.meta_marginal(model, inner=NEWTON)
    assert marginal.check({"y": S["y"]}).dim == 1
    value = jax.jit(lambda p: log_density(marginal, ({"y": S["y"]},), {}, p)[0])({"tau": 0.5})
    assert value.dtype == jnp.float32 and np.isfinite(value)


def test_binomial_with_a_wide_prior_is_not_called_coupled():
    def model(n, k=None):
        beta = numpyro.sample("beta", dist.Normal(0, 1e3))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with hbm.tasks(k.shape[0], dim=-2):
            a = numpyro.sample("a", dist.Normal(beta, tau))
            with numpyro.plate("points", k.shape[1], dim=-1):
                numpyro.sample("k", dist.Binomial(n, logits=a), obs=k)

    data = {"n": jnp.full((3, 4), 10.0), "k": jnp.array([[1.0, 2, 3, 2], [4, 5, 6, 5],
                                                         [9, 8, 9, 10]])}
    spec = hbm.meta_marginal(model, inner=NEWTON).check(data, params={"beta": 0.0})
    assert spec.global_sites == ("beta", "tau")
    hbm.meta_marginal(model, inner=NEWTON).check(data)  # globals start as init_to_uniform


def test_lists_are_accepted_and_equal_arrays():
    marginal = hbm.meta_marginal(linear.model, inner=NEWTON)
    params = {"theta": jnp.zeros(2), "tau": 1.0, "sigma": 1.0}
    as_lists = {k: np.asarray(v).tolist() for k, v in S.items()}
    a = jax.jit(lambda p: log_density(marginal, (as_lists,), {}, p)[0])(params)
    b = jax.jit(lambda p: log_density(marginal, (S,), {}, p)[0])(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_check_is_cached_by_signature_but_values_are_always_checked(monkeypatch):
    from numpyro_hbmeta.marginal import meta_marginal as handler

    calls = []
    probe = handler.probe_task_independence
    monkeypatch.setattr(handler, "probe_task_independence",
                        lambda *a, **k: calls.append(1) or probe(*a, **k))
    marginal = hbm.meta_marginal(linear.model, inner=NEWTON)
    marginal.check(S)
    assert len(calls) == 1
    shifted = dict(S, y=S["y"] + 1.0)
    marginal.check(shifted)
    jax.eval_shape(lambda p: log_density(marginal, (shifted,), {}, p)[0],
                   {"theta": jnp.zeros(2), "tau": 1.0, "sigma": 1.0})
    assert len(calls) == 1  # same structure, shapes and dtypes: not probed again
    with pytest.raises(ValueError, match=r"support\['y'\].*task 0 point 0"):
        marginal.check(with_value(S, "y", (0, 0), jnp.nan))
    marginal.check({k: v[:2] for k, v in S.items()})
    assert len(calls) == 2  # new shapes: probed again


def test_probe_is_compiled_once_per_model_and_shapes():
    from numpyro_hbmeta.marginal.density import _probe_jit

    hbm.meta_marginal(linear.model, inner=NEWTON).check(S)
    before = _probe_jit._cache_size()
    hbm.meta_marginal(linear.model, inner=NEWTON).check(dict(S, y=S["y"] * 2.0))
    assert _probe_jit._cache_size() == before


def test_implicit_check_warns_when_its_probe_point_is_not_finite():
    def steep_model(x, y=None):
        s = numpyro.sample("s", dist.Normal(0.0, 1.0))
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            with numpyro.plate("points", x.shape[1], dim=-1):
                # scale exp(500 s) overflows or underflows anywhere but s ≈ 0
                numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), jnp.exp(500.0 * s)),
                               obs=y)

    marginal = hbm.meta_marginal(steep_model, inner=NEWTON)
    params = {"s": jnp.array(0.0), "theta": jnp.zeros(2)}
    with pytest.warns(UserWarning, match=r"could not check that tasks are independent: the "
                                         r"log density of task\(s\) \[0, 1, 2\]"):
        jax.eval_shape(lambda p: log_density(marginal, (S,), {}, p)[0], params)
    marginal.check(S, params=params)  # at a finite point: checked, no warning

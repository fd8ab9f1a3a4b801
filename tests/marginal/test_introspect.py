"""Clear errors for malformed models and data, each naming the site or argument."""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear

PARAMS = {"theta": jnp.zeros(2), "tau": jnp.array(1.0), "sigma": jnp.array(1.0)}


def evaluate(model, *data, objective="laplace", inner=None):
    marginal = hbm.meta_marginal(model, inner=inner or hbm.Newton(), objective=objective)
    params = {k: v for k, v in PARAMS.items()}
    return jax.eval_shape(lambda p: log_density(marginal, data, {}, p)[0], params)


def test_no_tasks_plate(linear_data):
    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        with numpyro.plate("tasks", x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), 1.0), obs=y)

    with pytest.raises(ValueError, match="no tasks plate"):
        evaluate(model, linear_data.support)


def test_task_axis_mismatch_names_the_site(linear_data):
    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            # A task site whose own task axis has the wrong size (3 instead of 6).
            numpyro.sample("phi", dist.Normal(theta, 1.0).expand([3, 1, 2]).to_event(1))

    expected = (r"site 'phi' inside tasks plate 'tasks': expected 6 tasks at batch dim -2, "
                r"got batch shape \(3, 1\)")
    with pytest.raises(ValueError, match=expected):
        evaluate(model, linear_data.support)


def test_data_with_wrong_number_of_tasks_names_the_argument(linear_data):
    data = dict(linear_data.support, y=linear_data.support["y"][:4])
    with pytest.raises(ValueError, match=r"support\['y'\] has shape \(4, 7\).*6 tasks"):
        hbm.meta_marginal(linear.model, inner=hbm.Newton()).check(data)


def test_discrete_task_latent_names_the_site(linear_data):
    def model(x, y=None):
        p = numpyro.sample("p", dist.Beta(1.0, 1.0))
        with hbm.tasks(x.shape[0], dim=-2):
            numpyro.sample("z", dist.Bernoulli(p).expand([1, 2]).to_event(1))

    with pytest.raises(ValueError, match="task site 'z' is discrete"):
        hbm.meta_marginal(model, inner=hbm.Newton()).check(linear_data.support)


def test_support_and_query_with_different_numbers_of_tasks(linear_data):
    query = {k: v[:3] for k, v in linear_data.query.items()}
    with pytest.raises(ValueError, match="support has 6 tasks but query has 3"):
        evaluate(linear.model, linear_data.support, query, objective="maml",
                 inner=hbm.TruncatedGD(1, 0.01))


def test_missing_model_argument_names_it(linear_data):
    with pytest.raises(ValueError, match=r"support .*missing model argument\(s\) \['x'\]"):
        evaluate(linear.model, {"y": linear_data.support["y"]})
    with pytest.raises(ValueError, match=r"query .*missing model argument\(s\) \['x'\]"):
        evaluate(linear.model, linear_data.support, {"y": linear_data.query["y"]},
                 objective="maml", inner=hbm.TruncatedGD(1, 0.01))


def test_objective_needs_the_right_data(linear_data):
    with pytest.raises(ValueError, match="scores the query set"):
        evaluate(linear.model, linear_data.support, objective="maml",
                 inner=hbm.TruncatedGD(1, 0.01))
    with pytest.raises(ValueError, match="evidence of the support data"):
        evaluate(linear.model, linear_data.support, linear_data.query)


def test_bad_handler_arguments():
    with pytest.raises(ValueError, match="objective"):
        hbm.meta_marginal(linear.model, inner=hbm.Newton(), objective="elbo")
    with pytest.raises(ValueError, match="curvature"):
        hbm.meta_marginal(linear.model, inner=hbm.Newton(), curvature="bfgs")
    with pytest.raises(TypeError, match="inner"):
        hbm.meta_marginal(linear.model, inner="newton")


def test_coupled_tasks_are_detected(linear_data):
    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        with hbm.tasks(x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            # Each task's mean uses the average of all tasks' φ: tasks are coupled.
            shared = jnp.mean(phi, axis=0, keepdims=True)
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(jnp.sum(x * (phi + shared), -1), 1.0), obs=y)

    with pytest.raises(ValueError, match="couples tasks"):
        hbm.meta_marginal(model, inner=hbm.Newton()).check(linear_data.support)
    hbm.meta_marginal(linear.model, inner=hbm.Newton()).check(linear_data.support)


def test_tasks_plate_marks_its_frame_and_scales_subsamples():
    from numpyro import handlers

    from numpyro_hbmeta.handlers import is_task_frame

    def model():
        with hbm.tasks(10, subsample_size=4):
            numpyro.sample("phi", dist.Normal(0.0, 1.0))

    tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    assert is_task_frame(tr["phi"]["cond_indep_stack"][0])
    assert tr["phi"]["value"].shape == (4,) and tr["phi"]["scale"] == 2.5

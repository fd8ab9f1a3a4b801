"""MetaEB as pure steps: update by hand equals run, chunks equal the progress-bar path,
streams equal fixed data, resume and save/load are exact, a second run compiles nothing, and
divergence or non-convergence is never silent."""

import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.models import linear


@pytest.fixture(scope="module")
def data():
    with jax.enable_x64(True):
        return linear.simulate(jax.random.PRNGKey(0), num_tasks=6, num_support=7, num_query=5)


@pytest.fixture(scope="module")
def maml():
    return hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(3, 0.001), objective="maml")


def quiet_run(driver, *args, **kwargs):
    """A short run whose outer optimisation has (rightly) not converged: that warning is
    tested below, here it is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MetaEB: the outer optimisation has not converged")
        return driver.run(*args, progress_bar=kwargs.pop("progress_bar", False), **kwargs)


def assert_same_state(a, b):
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(a.step) == int(b.step)


def test_update_by_hand_equals_run_bit_for_bit(x64, data, maml):
    # 120 steps cross two compiled chunks (50 + 50 + 20).
    result = quiet_run(maml, jax.random.PRNGKey(3), 120, data.support, data.query)
    key_init, key_steps = jax.random.split(jax.random.PRNGKey(3))
    state = maml.init(key_init, data.support, data.query)
    losses = []
    for t in range(120):
        state, info = maml.update(state, jax.random.fold_in(key_steps, t), data.support,
                                  data.query)
        losses.append(info.loss)
        assert bool(info.ok) and int(info.num_diverged) == 0
    assert_same_state(state, result.state)
    np.testing.assert_array_equal(np.asarray(losses), result.losses)
    assert result.inactive_sites == ("tau",)


def test_progress_bar_path_equals_the_chunked_path(x64, data, maml):
    plain = quiet_run(maml, jax.random.PRNGKey(4), 60, data.support, data.query)
    stream = io.StringIO()  # not a terminal: plain lines, never tqdm's carriage returns
    import numpyro_hbmeta.infer.progress as progress

    original = progress.Progress.__init__

    def to_stream(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "stream": stream, "every": 0.0})

    progress.Progress.__init__ = to_stream
    try:
        shown = quiet_run(maml, jax.random.PRNGKey(4), 60, data.support, data.query,
                          progress_bar=True)
    finally:
        progress.Progress.__init__ = original
    assert_same_state(plain.state, shown.state)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[-1].startswith("MetaEB maml: 60/60")


def test_a_stream_of_the_same_batch_equals_fixed_data(x64, data, maml):
    fixed = quiet_run(maml, jax.random.PRNGKey(5), 70, data.support, data.query)
    calls = []

    def source(key, step):
        calls.append(step)
        return data.support, data.query

    streamed = quiet_run(maml, jax.random.PRNGKey(5), 70, task_source=source)
    assert_same_state(fixed.state, streamed.state)
    assert calls[0] == 0 and calls[-1] == 69  # step 0 also served the model check and init
    iterated = quiet_run(maml, jax.random.PRNGKey(5), 70,
                         task_source=iter([(data.support, data.query)] * 70))
    assert_same_state(fixed.state, iterated.state)
    with pytest.raises(ValueError, match="ran out of episodes at step 3"):
        quiet_run(maml, jax.random.PRNGKey(5), 5,
                  task_source=iter([(data.support, data.query)] * 3))
    with pytest.raises(ValueError, match="either support/query data or a task_source"):
        maml.run(jax.random.PRNGKey(5), 5, data.support, task_source=source)


def test_resume_equals_an_uninterrupted_run(x64, data):
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")
    support = data.all_data()
    whole = quiet_run(driver, jax.random.PRNGKey(6), 80, support, task_batch_size=4)
    first = quiet_run(driver, jax.random.PRNGKey(6), 30, support, task_batch_size=4)
    rest = quiet_run(driver, jax.random.PRNGKey(6), 50, support, task_batch_size=4,
                     init_state=first.state)
    assert_same_state(whole.state, rest.state)
    np.testing.assert_array_equal(np.concatenate([first.losses, rest.losses]), whole.losses)


def test_a_second_run_compiles_nothing(x64, data, maml, compiles):
    quiet_run(maml, jax.random.PRNGKey(7), 10, data.support, data.query)
    with compiles() as names:
        quiet_run(maml, jax.random.PRNGKey(8), 37, data.support, data.query)
    assert names == []


def test_a_run_compiles_its_chunk_once_with_an_optimiser_that_starts_weakly_typed(
        x64, data, compiles):
    # optax.lbfgs starts its line-search info with weakly typed Python floats that leave the
    # first compiled chunk strongly typed; unless init normalises them, the second chunk
    # compiled the whole loop again.
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(3, 0.001), objective="maml",
                        optimizer=optax.lbfgs())
    with compiles() as names:  # 51 steps: two chunks (50 + 1)
        fit = driver.run(jax.random.PRNGKey(7), 51, data.support, data.query,
                         progress_bar=False, final_checks=False)
    assert int(fit.state.step) == 51
    assert [name for name in names if "_chunk" in name] == ["jit(_chunk)"]


def test_save_load_then_sample_posterior_equals_the_original(tmp_path, data):
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.adam(0.05))
    support = data.all_data()
    fit = quiet_run(driver, jax.random.PRNGKey(9), 40, support)
    path = tmp_path / "fit.npz"
    driver.save(path, fit)
    loaded, result = hbm.MetaEB.load(path, linear.model, optimizer=optax.adam(0.05))
    assert loaded.inner == driver.inner and loaded.marginal.objective == "laplace"
    assert_same_state(fit.state, result.state)
    key = jax.random.PRNGKey(10)
    original = driver.sample_posterior(key, fit.params, support, 50)
    again = loaded.sample_posterior(key, result.params, support, 50)
    for name in original:
        np.testing.assert_array_equal(original[name], again[name])
    # The loaded state goes on exactly where the original would.
    on = quiet_run(driver, jax.random.PRNGKey(9), 10, support, init_state=fit.state)
    on_loaded = quiet_run(loaded, jax.random.PRNGKey(9), 10, support, init_state=result.state)
    assert_same_state(on.state, on_loaded.state)
    with pytest.raises(ValueError, match="optimizer passed to load has a state with"):
        hbm.MetaEB.load(path, linear.model, optimizer=optax.sgd(0.1))


def test_a_diverging_inner_loop_is_refused_with_tasks_and_a_step_size_bound():
    # The README's model and sizes: β = 0.3 is ~60× past 1/λ_max; the inner losses overflow.
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=6, num_support=10, num_query=10)
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(5, 0.3), objective="maml")
    with pytest.raises(FloatingPointError) as err:
        driver.run(jax.random.PRNGKey(0), 100, data.support, data.query, progress_bar=False)
    message = str(err.value)
    assert "step 0 was refused" in message
    assert "diverged for task(s) [0, 1, 2, 3, 4, 5]" in message
    bound = float(message.split("1/λ_max = ")[1].split()[0])
    x = np.asarray(data.support["x"])
    # λ_max of X_jᵀX_j/σ² at the start's σ is what the message's bound inverts.
    assert 0 < bound < 0.3 and "β = 0.3" in message and x.shape == (6, 10, 2)


def test_a_mildly_diverging_inner_loop_warns_once_naming_the_task(x64):
    # Task 0's inputs are 10× larger: with σ = 1, λ_max(task 0) ≈ 100× the others'. A step
    # of 2.5/λ_max(task 0) makes task 0's inner loss rise (β·λ > 2) while the others
    # descend; the objective stays finite, so the fit goes on and warns.
    data = linear.simulate(jax.random.PRNGKey(1), num_tasks=5, num_support=8, num_query=4)
    scale = jnp.ones((5, 1, 1)).at[0].set(10.0)
    support = {**data.support, "x": data.support["x"] * scale}
    query = {**data.query, "x": data.query["x"] * scale}
    x0 = np.asarray(support["x"][0])
    lam0 = np.linalg.eigvalsh(x0.T @ x0).max()  # σ = 1 below
    beta = 2.5 / lam0
    others = max(np.linalg.eigvalsh(np.asarray(support["x"][j]).T @ np.asarray(
        support["x"][j])).max() for j in range(1, 5))
    assert beta * others < 1  # only task 0 is past the bound
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(2, float(beta)), objective="maml",
                        optimizer=optax.sgd(1e-6))
    start = {"theta": jnp.array([0.5, 0.5]), "tau": jnp.array(1.0), "sigma": jnp.array(1.0)}
    with pytest.warns(UserWarning, match=r"at step 0, the inner gradient descent diverged .*"
                                         r"for 1 task\(s\), e\.g\. \[0\]\. β = ") as record:
        result = quiet_run(driver, jax.random.PRNGKey(2), 3, support, query,
                           init_params=start)
    diverged = [w for w in record if "diverged" in str(w.message)]
    assert len(diverged) == 1  # once per kind, not once per step
    assert np.all(np.isfinite(result.losses))


def test_gradient_overflow_is_refused_not_returned_as_the_start():
    # β = 10: gradients ~1e24 overflow Adam's second moment, so θ would never move and the
    # start would come back as "the fit".
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=6, num_support=10, num_query=10)
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(5, 10.0), objective="maml")
    with pytest.raises(FloatingPointError, match="step 0 was refused"):
        driver.run(jax.random.PRNGKey(0), 20, data.support, data.query, progress_bar=False)


@pytest.mark.slow  # a whole fit (~15-35 s); the full suite runs it
def test_outer_convergence_is_judged_and_reported(x64, data, maml):
    with pytest.warns(UserWarning, match=r"has not converged after 30 steps: gradient norm"):
        short = maml.run(jax.random.PRNGKey(11), 30, data.support, data.query,
                         progress_bar=False)
    assert short.converged is False
    assert short.convergence.rel_loss_change > short.convergence.loss_rtol
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                        optimizer=optax.lbfgs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged exact fit warns about nothing
        exact = driver.run(jax.random.PRNGKey(12), 60, data.all_data(), progress_bar=False)
    assert exact.converged is True
    assert exact.convergence.grad_norm <= exact.convergence.grad_tol


def test_maml_warns_when_the_implicit_prior_does_not_exist_at_the_fit(x64, data):
    # β·λ_max ≥ 1 for every task at σ = 0.3 (λ_max of XᵀX/σ² is ~100 here), with the fit
    # frozen there (sgd with a negligible rate): the warning names the tasks and the bound.
    x = np.asarray(data.support["x"])
    lam = np.array([np.linalg.eigvalsh(xj.T @ xj).max() for xj in x]) / 0.3**2
    beta = 1.05 / lam.min()
    assert np.all(beta * lam >= 1) and np.all(beta * lam < 2)  # the loss still falls
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(1, float(beta)), objective="maml",
                        optimizer=optax.sgd(1e-12))
    start = {"theta": jnp.array([0.5, 0.5]), "tau": jnp.array(1.0), "sigma": jnp.array(0.3)}
    with pytest.warns(UserWarning, match=r"at the fitted globals β·λ_max ≥ 1 for 6 task\(s\)"):
        quiet_run(driver, jax.random.PRNGKey(13), 2, data.support, data.query,
                  init_params=start)


@pytest.mark.slow
def test_fresh_episodes_train_the_sinusoid_as_well_as_a_fixed_pool():
    # MAML's own protocol (fresh tasks every step, through task_source) against the fixed
    # pool of tasks the experiment used (random batches of 25 from 100): same steps, same
    # optimiser, same start; query MSE after adaptation on 50 held-out tasks.
    from numpyro_hbmeta.models import sinusoid

    inner = hbm.TruncatedGD(5, sinusoid.FIT_SETTINGS.maml_step_size)
    start = sinusoid.init_params(jax.random.PRNGKey(0))

    @jax.jit
    def episodes(rng_key):
        data = sinusoid.simulate(rng_key, num_tasks=25, shots=10, num_query=10)
        return data.support, data.query

    def fit(**data):
        driver = hbm.MetaEB(sinusoid.model, inner=inner, objective="maml",
                            optimizer=optax.adam(1e-2))
        return quiet_run(driver, jax.random.PRNGKey(1), 400, init_params=start,
                         **data).params

    pool = sinusoid.simulate(jax.random.PRNGKey(2), num_tasks=100, shots=10, num_query=10)
    pooled = fit(support=pool.support, query=pool.query, task_batch_size=25)
    streamed = fit(task_source=lambda key, step: episodes(key))
    test = sinusoid.simulate(jax.random.PRNGKey(3), num_tasks=50, shots=10, num_query=10)

    def task_mse(params):
        predictive = sinusoid.laplace_predictive(params, test.support, test.query["x"],
                                                 inner=inner)
        return np.mean((np.asarray(predictive.mean) - np.asarray(test.query["y"])) ** 2, -1)

    before, pooled_mse, streamed_mse = task_mse(start), task_mse(pooled), task_mse(streamed)
    difference = streamed_mse - pooled_mse  # paired over the same held-out tasks
    se = difference.std(ddof=1) / np.sqrt(difference.size)
    print(f"query MSE: start {before.mean():.3f}, pool {pooled_mse.mean():.3f}, "
          f"stream {streamed_mse.mean():.3f} (se of the difference {se:.3f})")
    assert streamed_mse.mean() < 0.5 * before.mean()  # both really trained
    assert pooled_mse.mean() < 0.5 * before.mean()
    # Within noise: fresh episodes are not worse than the pool by more than 3 standard errors.
    assert difference.mean() < 3 * se, (streamed_mse.mean(), pooled_mse.mean(), se)

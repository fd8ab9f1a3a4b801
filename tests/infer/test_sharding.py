"""Tasks sharded over devices: a sharded run equals the single-device run, and the per-task
arrays really are split. Runs in a subprocess with four forced host devices (the device count
is fixed when JAX starts, so it cannot change inside this test process)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, warnings
    from jax.sharding import NamedSharding
    import numpyro_hbmeta as hbm
    from numpyro_hbmeta.models import linear, sinusoid
    warnings.simplefilter("ignore")
    assert jax.device_count() == 4, jax.devices()

    def fit(model, inner, objective, data, mesh, steps, **kw):
        driver = hbm.MetaEB(model, inner=inner, objective=objective, mesh=mesh,
                            optimizer=optax.adam(1e-2))
        support, query = driver.shard(data.support, data.query if objective != "laplace"
                                      else None)
        result = driver.run(jax.random.PRNGKey(1), steps, support, query,
                            progress_bar=False, **kw)
        return driver, support, result

    with jax.enable_x64(True):
        data = linear.simulate(jax.random.PRNGKey(0), num_tasks=8, num_support=6,
                               num_query=4)

        one = fit(linear.model, hbm.Newton(), "laplace",
                  data._replace(support=data.all_data(), query=None), None, 60)
        four = fit(linear.model, hbm.Newton(), "laplace",
                   data._replace(support=data.all_data(), query=None), "auto", 60)
        sharded = four[1]["x"].sharding
        assert isinstance(sharded, NamedSharding) and sharded.spec[0] == "tasks", sharded
        assert len(four[1]["x"].addressable_shards) == 4
        assert four[1]["x"].addressable_shards[0].data.shape[0] == 2
        for name in one[2].params:
            np.testing.assert_allclose(four[2].params[name], one[2].params[name],
                                       rtol=1e-10, atol=1e-12)
        theta = four[2].state.params["theta"]
        assert theta.sharding.is_fully_replicated, theta.sharding
        batched = [fit(linear.model, hbm.Newton(), "laplace",
                       data._replace(support=data.all_data(), query=None), mesh, 20,
                       task_batch_size=4)[2] for mesh in (None, "auto")]
        for name in batched[0].params:
            np.testing.assert_allclose(batched[1].params[name], batched[0].params[name],
                                       rtol=1e-10, atol=1e-12)
        print("linear ok")

    data = sinusoid.simulate(jax.random.PRNGKey(0), num_tasks=8, shots=5, num_query=5)
    inner = hbm.TruncatedGD(2, 0.002)
    start = sinusoid.init_params(jax.random.PRNGKey(2))
    runs = [fit(sinusoid.model, inner, "maml", data, mesh, 5, init_params=start)[2]
            for mesh in (None, "auto")]
    np.testing.assert_allclose(runs[1].params["theta"], runs[0].params["theta"],
                               rtol=1e-5, atol=1e-6)
    print("sinusoid ok")
""")


@pytest.mark.slow
def test_sharded_run_equals_single_device_run():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "linear ok" in run.stdout and "sinusoid ok" in run.stdout

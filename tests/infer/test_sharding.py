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
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
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

        # init gives the state replicated over the mesh; update driven by hand on it, with a
        # task batch split over the devices, equals the single-device steps.
        mesh = Mesh(np.asarray(jax.devices()), ("tasks",))
        laplace = dict(inner=hbm.Newton(), objective="laplace", optimizer=optax.adam(0.05))
        states = {}
        for devices in (1, 4):
            driver = hbm.MetaEB(linear.model, **laplace,
                                mesh=None if devices == 1 else mesh)
            support, _ = driver.shard(data.all_data())
            state = driver.init(jax.random.PRNGKey(1), support)
            if devices == 4:
                for leaf in jax.tree.leaves(state):
                    assert leaf.sharding == NamedSharding(mesh, P()), leaf.sharding
            for i in range(4):
                state, info = driver.update(state, jax.random.fold_in(jax.random.PRNGKey(2), i),
                                            support, task_batch_size=4)
                assert bool(info.ok)
            states[devices] = state
        for name in states[1].params:
            np.testing.assert_allclose(states[4].params[name], states[1].params[name],
                                       rtol=1e-10, atol=1e-12)
        try:
            driver.update(states[4], jax.random.PRNGKey(0), support, task_batch_size=6)
            raise AssertionError("a task batch of 6 over 4 devices was accepted")
        except ValueError as err:
            assert "task_batch_size=6" in str(err) and "4 or 8" in str(err), err
        print("update ok")

    # The batched step's per-task work is split: FLOPs per device fall with 4 devices.
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=256, num_support=10)
    flops = {}
    for devices in (1, 4):
        driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                            mesh=Mesh(np.asarray(jax.devices()[:devices]), ("tasks",)))
        support, _ = driver.shard(data.support)
        state = driver.init(jax.random.PRNGKey(1), support)
        step = jax.jit(driver.update, static_argnames="task_batch_size")
        compiled = step.lower(state, jax.random.PRNGKey(3), support,
                              task_batch_size=128).compile()
        flops[devices] = compiled.cost_analysis()["flops"]
        text = compiled.as_text()
        assert devices == 1 or "f32[32,10,2]" in text  # 128 / 4 tasks per device
    assert flops[4] <= 0.5 * flops[1], flops
    print("flops ok", flops)

    # The CPU eigh/Cholesky loop keeps a sharded batch split (no all-gather, 4096 / 4 per
    # device in chunks small enough that jaxlib runs each call inline).
    from numpyro_hbmeta.curvature import _linalg
    x = np.random.default_rng(0).normal(size=(4096, 2, 4)).astype(np.float32)
    x = x @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(2, dtype=np.float32)
    split = jax.device_put(x, NamedSharding(Mesh(np.asarray(jax.devices()), ("tasks",)),
                                            P("tasks")))
    for fn, ref in ((_linalg.cholesky, np.linalg.cholesky),
                    (_linalg.eigvalsh, np.linalg.eigvalsh)):
        compiled = jax.jit(fn).lower(split).compile()
        text = compiled.as_text()
        assert "all-gather" not in text and "f32[4096" not in text, fn
        np.testing.assert_allclose(compiled(split), ref(x), rtol=1e-4, atol=1e-5)
    print("linalg ok")

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
    # The suite's own XLA flags (conftest: the cheapest backend optimisation level) are kept.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-6000:]
    for part in ("linear", "update", "flops", "linalg", "sinusoid"):
        assert f"{part} ok" in run.stdout, run.stdout

"""Task batches: a uniformly random subset drawn in O(batch), and a batched step whose compiled
cost does not grow with the number of tasks (a structural check on the lowered program)."""

import itertools

import jax
import numpy as np
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.data import sample_task_batch
from numpyro_hbmeta.models import linear


def test_every_subset_is_equally_likely():
    # J = 6, B = 2: 15 subsets. 30,000 draws; chi-square with 14 degrees of freedom has its
    # 0.999 quantile at 36.1, so a correct sampler fails this once in a thousand seeds.
    keys = jax.random.split(jax.random.PRNGKey(0), 30_000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_task_batch(k, 6, 2)))(keys))
    assert np.all(draws[:, 0] != draws[:, 1]) and draws.min() >= 0 and draws.max() <= 5
    counts = {tuple(sorted(d)): 0 for d in itertools.combinations(range(6), 2)}
    for d in draws:
        counts[tuple(sorted(d))] += 1
    expected = len(draws) / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 36.1, counts


@pytest.mark.parametrize("num_tasks, batch", [(10, 10), (1000, 7), (10**6, 256)])
def test_indices_are_distinct_and_in_range(num_tasks, batch):
    indices = np.asarray(sample_task_batch(jax.random.PRNGKey(1), num_tasks, batch))
    assert len(set(indices.tolist())) == batch and indices.min() >= 0 and indices.max() < num_tasks


def test_a_batched_step_costs_the_same_at_a_thousand_and_a_hundred_thousand_tasks():
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")

    def flops(num_tasks):
        data = linear.simulate(jax.random.PRNGKey(0), num_tasks=num_tasks, num_support=10,
                               num_query=0).support
        state = driver.init(jax.random.PRNGKey(1), data)
        step = jax.jit(driver.update, static_argnames=("task_batch_size",))
        lowered = step.lower(state, jax.random.PRNGKey(2), data, task_batch_size=64)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    small, large = flops(1_000), flops(100_000)
    # The 64 tasks' own work is the same; before Floyd's sampler the permutation of all J
    # indices made the step 15x dearer at 10⁵ (benchmarks/scale_tasks.py).
    assert large <= 1.05 * small, (small, large)


# -- full-data passes in chunks (issue 12 item 3) ----------------------------------------------
def test_chunked_full_loss_equals_the_whole_loss_with_a_ragged_last_chunk(x64):
    # 200 tasks in chunks of 64: 64, 64, 64 and 8 (padded to 64 with weight 0). With
    # hyperprior=True, log p(θ) must be counted once, not once per chunk (without it the
    # chunks' sum is the plain sum of per-task terms, the case this one contains).
    # MAML's objective (a cheap compile) with a query set: support and query are chunked alike.
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=200, num_support=10, num_query=5)
    driver = hbm.MetaEB(linear.model, inner=hbm.TruncatedGD(2, 1e-3), objective="maml",
                        hyperprior=True)
    params = driver.init(jax.random.PRNGKey(1), data.support, data.query).params
    whole = float(driver.loss(params, data.support, data.query))
    np.testing.assert_allclose(
        driver._full_loss(params, data.support, data.query, chunk_size=64), whole, rtol=1e-10)
    # Data in host memory: each chunk is gathered by NumPy and only it is moved.
    host = [{k: np.asarray(v) for k, v in d.items()} for d in (data.support, data.query)]
    np.testing.assert_allclose(driver._full_loss(params, *host, chunk_size=64), whole,
                               rtol=1e-10)


def _schools(num_copies: int, spread: float):
    from numpyro_hbmeta.models import eight_schools

    data = eight_schools.load_data().support
    return {k: np.tile(np.asarray(v, np.float64) * (spread if k == "y" else 1.0), num_copies)
            for k, v in data.items()}


@pytest.fixture(scope="module")
def schools_driver():
    from numpyro_hbmeta.models import eight_schools

    return hbm.MetaEB(eight_schools.model, inner=hbm.Newton(), objective="laplace")


@pytest.mark.parametrize("spread, tau, expected", [(1.0, 1e-2, ("tau",)),  # at 0
                                                   (4.0, 20.0, ())])       # inside
def test_boundary_check_gives_the_same_answer_chunked_and_whole(x64, schools_driver, spread,
                                                                tau, expected):
    support = _schools(5, spread)  # 40 schools; chunks of 3: the last one holds 1
    driver = schools_driver  # one driver: its compiled losses serve both cases
    mu = float(np.average(support["y"], weights=1 / (support["sigma"] ** 2 + tau ** 2)))
    params = {"mu": np.float64(mu), "tau": np.float64(tau)}
    # The answer from the whole-data loss, as before chunking (loss(τ/1000) ≤ loss(τ) + tol).
    unconstrained = {"mu": mu, "tau": np.log(tau)}
    base = float(driver.loss(unconstrained, support))
    shrunk = float(driver.loss({**unconstrained, "tau": np.log(tau * 1e-3)}, support))
    whole = ("tau",) if shrunk <= base + 1e-6 * (1 + abs(base)) else ()
    assert whole == expected
    for chunk in (3, None):  # ragged chunks; one chunk of all 40
        assert driver.boundary_sites(params, support, chunk_size=chunk) == expected


def test_a_chunk_of_the_full_loss_uses_the_same_memory_at_a_thousand_and_a_hundred_thousand():
    # The pass over all tasks is a gather of one chunk plus the compiled chunk loss; neither's
    # temporary buffers may grow with J (the data are an argument, never copied whole). The
    # whole-data loss, for contrast, needs temporaries in proportion to J.
    driver = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace")
    chunk = 256
    params = driver.init(jax.random.PRNGKey(1), linear.simulate(
        jax.random.PRNGKey(0), num_tasks=10, num_support=10).support).params
    from numpyro_hbmeta.infer.diagnose import _take_jit

    def temp_bytes(num_tasks):
        data = {"x": jax.ShapeDtypeStruct((num_tasks, 10, 2), np.float32),
                "y": jax.ShapeDtypeStruct((num_tasks, 10), np.float32)}
        indices = jax.ShapeDtypeStruct((chunk,), np.int32)
        gather = _take_jit.lower(data, indices).compile()
        part = jax.eval_shape(_take_jit, data, indices)
        loss = driver._chunk_loss_jit.lower(
            params, part, None, indices, jax.ShapeDtypeStruct((chunk,), bool),
            jax.ShapeDtypeStruct((), bool), plate_name="tasks").compile()
        whole = driver._loss_jit.lower(params, data).compile()
        return [c.memory_analysis().temp_size_in_bytes for c in (gather, loss, whole)]

    small, large = temp_bytes(1_000), temp_bytes(100_000)
    assert large[0] <= 1.05 * small[0] + 1024 and large[1] <= 1.05 * small[1] + 1024, (
        small, large)
    assert large[2] > 20 * large[1], (small, large)  # the unchunked pass does grow

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

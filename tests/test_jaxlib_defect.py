"""Regression test for a jaxlib defect: wrong per-task curvature beyond ~16k data rows on CPU.

jax/jaxlib 0.10.2 miscompiles, on CPU, a jitted vmapped product followed by a reduction once
the rows pass 2¹⁴ (float64) or 2¹⁵ (float32) (jax-ml/jax#39103). The per-task Hessians that
the library's Laplace evidence, task posterior and implicit prior are built from then come out
wrong with no error: on the linear model below, with 4000 tasks of 10 points (40,000 rows) in
float32, every task's Hessian is off by up to 170 % (measured with 0.10.2; 2e-7 with 0.10.1).
On this path 0.10.2 gets float64 right; the float64 case holds the library's exactness
(rtol 1e-10) for a release whose defect reaches it.
``pyproject.toml`` excludes 0.10.2; this test checks the numbers, not the version, so a later
release with the same defect fails here too.

The oracle: in the linear zoo model (y_jn = x_jnᵀ φ_j + ε, ε ~ N(0, σ²), φ_j ~ N(θ, τ² I)) the
Hessian of each task's negative log joint in φ_j is XⱼᵀXⱼ/σ² + I/τ², whatever φ_j.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_hbmeta as hbm
from numpyro_hbmeta.curvature import hessian_blocks
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.models import linear

NUM_TASKS = 4000  # 4000 tasks x 10 points = 40,000 rows: past 2¹⁴ and 2¹⁵
NUM_POINTS = 10
SIGMA, TAU = 0.5, 0.7


def library_hessians(dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-task Hessians of the negative log joint by the library's jitted path, and x."""
    data = linear.simulate(jax.random.PRNGKey(0), num_tasks=NUM_TASKS, num_support=NUM_POINTS)
    support = {k: jnp.asarray(v, dtype) for k, v in data.all_data().items()}
    params = {"theta": jnp.asarray([1.0, -0.5], dtype), "tau": jnp.asarray(TAU, dtype),
              "sigma": jnp.asarray(SIGMA, dtype)}
    marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton(), objective="laplace")
    context = context_at(linear.model, params, support)
    # Away from φ⁰ = θ, where a solve's iterates would be.
    phi = context.phi0 + jax.random.normal(jax.random.PRNGKey(1), context.phi0.shape, dtype)

    @jax.jit
    def hessians(phi, support):
        # As the Laplace objective and posterior.py do: the inner solver's loss (the negative
        # log joint under Newton) and d batched Hessian-vector products.
        return hessian_blocks(marginal.inner_loss(context, support), phi)

    got = hessians(phi, support)
    assert got.dtype == dtype and got.shape == (NUM_TASKS, 2, 2)
    return np.asarray(got, np.float64), np.asarray(support["x"], np.float64)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_per_task_hessians_beyond_16k_rows_match_the_closed_form(dtype, rtol):
    with jax.enable_x64(dtype == jnp.float64):
        got, x = library_hessians(dtype)
    expected = np.einsum("jnf,jng->jfg", x, x) / SIGMA**2 + np.eye(2) / TAU**2
    # Relative to each task's largest entry: off-diagonal entries may be near 0.
    error = np.abs(got - expected).max((-2, -1)) / np.abs(expected).max((-2, -1))
    wrong = np.flatnonzero(~(error <= rtol))
    assert wrong.size == 0, (
        f"jax {jax.__version__}: per-task Hessians differ from XᵀX/σ² + I/τ² for {wrong.size} "
        f"of {NUM_TASKS} tasks (largest relative error {error.max():.3g}, first tasks "
        f"{wrong[:5].tolist()}); see jax-ml/jax#39103")

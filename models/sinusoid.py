"""Sinusoid regression, MAML's toy problem, as a hierarchical model over network weights.

Task j is y = A_j sin(x − b_j) with amplitude A_j ~ U[0.1, 5], phase b_j ~ U[0, π] and inputs
x ~ U[−5, 5] (Finn et al. 2017, §5.1; Grant et al., ICLR 2018, §5.1). Each task is fitted by a
1-40-40-1 ReLU network whose weights are the task parameters:

    θ ~ N(0, I)                      global network weights, (1761,)
    φ_j ~ N(θ, τ² I)                 task weights, τ = ``TAU`` (fixed)
    y_jn ~ N(f(x_jn; φ_j), σ²)       σ = ``NOISE`` (fixed)

The dense layers are declared with :func:`numpyro_hbmeta.layers.dense_layer`, so
``curvature="kfac"`` (LLAMA) sees them. Layer l computes (a / √d_l) W_l + b_l, the
"NTK" parametrisation: the unit-scale prior above is LeCun's initialisation, and MetaEB's
default start U(−2, 2) gives well-scaled activations; the 1/√d_l scales the layer *input*, so
W_l and b_l are the task parameters themselves, as K-FAC needs. φ_j lays out each layer's
W̄ = [W; b] row-major in layer order (:func:`numpyro_hbmeta.kfac.vec_mlp`).

Fixed τ and σ: MAML's and LLAMA's objectives do not involve τ (the inner loop's early stopping
is the prior), and a learnt σ would change the inner step size on the likelihood scale while
training (the step on Σ (f − y)²/2σ² is β; on the mean squared error it is β K / 2σ²), so both
are constants here; ``LAPLACE_EXACT = False`` (the network is non-linear in φ).
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handler import meta_marginal
from numpyro_hbmeta.implicit_prior import context_at
from numpyro_hbmeta.kfac import unvec_mlp
from numpyro_hbmeta.layers import dense_layer
from numpyro_hbmeta.plate import tasks

SUMMARY = "MAML's sinusoid regression, simulated; 1-40-40-1 ReLU net, K-FAC layers"
GLOBALS = ("theta",)
TASK_SITES = ("phi",)
LAPLACE_EXACT = False

SIZES = (1, 40, 40, 1)
NUM_PARAMS = sum((a + 1) * b for a, b in itertools.pairwise(SIZES))  # 1761
NOISE = 0.5
TAU = 1.0
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT = (-5.0, 5.0)

# `hbmeta compare sinusoid` is not supported yet: NUTS over ~19k weights is infeasible on a
# CPU, a 1761-row globals table says nothing, and the dense task posterior is 1761² per task.
# The MAML/LLAMA comparison lives in tests/models/test_sinusoid.py and benchmarks/.
COMPARE_METHODS: tuple[str, ...] = ()

# MetaEB settings read by ``numpyro_hbmeta.methods``. The inner step is on the summed NLL
# Σ (f − y)²/2σ²: β = 0.003 is a step of β·K/2σ² = 0.06 on the mean squared error of K = 10
# shots (MAML's 0.01 is for the standard parametrisation; here hidden weights move the
# function 1/√40 as much per unit step). Measured on 25 tasks: β = 0.01 diverged on held-out
# tasks after meta-training, β = 0.003 adapted best. With other shots K, keep β·K fixed.
FIT = {"maml_steps": 5, "maml_step_size": 0.003, "eb_learning_rate": 1e-2,
       "llama_curvature": "kfac"}


def network(phi: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """f(x; φ) per task: ``phi`` (tasks, 1761), ``x`` (tasks, points, 1) -> (tasks, points)."""
    params = unvec_mlp(phi, SIZES)
    h = x
    for layer in range(len(SIZES) - 1):
        p = params[f"dense_{layer}"]
        s = dense_layer(f"dense_{layer}", h / math.sqrt(SIZES[layer]), p["w"], p["b"])
        h = jax.nn.relu(s) if layer < len(SIZES) - 2 else s
    return h[..., 0]


def model(x, y=None):
    """x: (tasks, points, 1); y: (tasks, points)."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([NUM_PARAMS]).to_event(1))
    with tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, TAU).to_event(1))  # (tasks, 1, 1761)
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(network(phi[:, 0], x), NOISE), obs=y)


def init_params(rng_key) -> dict[str, jnp.ndarray]:
    """A draw of θ from its prior with zero biases (LeCun's initialisation here)."""
    is_bias = np.concatenate([np.r_[np.zeros(a * b), np.ones(b)]
                              for a, b in itertools.pairwise(SIZES)]).astype(bool)
    theta = jax.random.normal(rng_key, (NUM_PARAMS,))
    return {"theta": jnp.where(is_bias, 0.0, theta)}


def simulate(rng_key, *, num_tasks: int, shots: int, num_query: int) -> TaskData:
    """``num_tasks`` sinusoids, ``shots`` support and ``num_query`` query points each.

    Example:
        >>> data = simulate(jax.random.PRNGKey(0), num_tasks=3, shots=5, num_query=7)
        >>> data.support["x"].shape, data.query["y"].shape
        ((3, 5, 1), (3, 7))
    """
    amplitude, phase, x = _draw(rng_key, num_tasks, shots + num_query)
    y = amplitude[:, None] * jnp.sin(x[..., 0] - phase[:, None])
    return TaskData(
        support={"x": x[:, :shots], "y": y[:, :shots]},
        query={"x": x[:, shots:], "y": y[:, shots:]},
        task_labels=[f"task{j}" for j in range(num_tasks)],
        truth={"amplitude": amplitude, "phase": phase},
    )


@partial(jax.jit, static_argnums=(1, 2))
def _draw(rng_key, num_tasks: int, num_points: int):
    key_a, key_b, key_x = jax.random.split(rng_key, 3)
    amplitude = jax.random.uniform(key_a, (num_tasks,), minval=AMPLITUDE[0],
                                   maxval=AMPLITUDE[1])
    phase = jax.random.uniform(key_b, (num_tasks,), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(key_x, (num_tasks, num_points, 1), minval=INPUT[0],
                           maxval=INPUT[1])
    return amplitude, phase, x


def load_data(rng_key=None, *, small: bool = False, shots: int = 10) -> TaskData:
    """25 tasks (10 when ``small``) of ``shots`` support + ``shots`` query points."""
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    return simulate(rng_key, num_tasks=10 if small else 25, shots=shots, num_query=shots)


def predictive_log_lik(params, support, query, *, inner, curvature=None) -> jnp.ndarray:
    """Held-out log-likelihood of each task's query set given its support set, (tasks,).

    With ``curvature=None``, MAML's plug-in predictive at φ̂_j = inner(θ, support_j):
    Σ_n log N(y_n | f(x_n; φ̂_j), σ²). With a curvature builder (e.g. ``GGN(damping=δ)`` or
    ``KFAC(damping=δ)`` from :mod:`numpyro_hbmeta.curvature`), LLAMA's Laplace task posterior
    N(φ̂_j, Ĥ_j⁻¹), Ĥ_j the curvature of the support negative log-likelihood at φ̂_j plus δI
    (the damping acts as an isotropic prior precision; Grant et al., ICLR 2018, §4), with the
    linearised (GLM) predictive

        log N(y | f(x; φ̂_j), σ² I + J_j Ĥ_j⁻¹ J_jᵀ),   J_j = ∂f(x; φ)/∂φ at φ̂_j,

    x, y the query points (Immer et al. 2021 on why linearise).

    Args:
        params: constrained globals, ``{"theta": (1761,)}``.
        support: ``{"x", "y"}`` of the support set; query: the same for the query set.
        inner: the inner solver that gives φ̂ (``TruncatedGD``).
        curvature: ``None`` or a curvature builder.
    """
    marginal = meta_marginal(model, inner=inner, objective="maml")
    context = context_at(model, params, support)
    x, y = jnp.asarray(query["x"]), jnp.asarray(query["y"])

    @jax.jit
    def compute(support, x, y):
        phi_hat, _ = marginal.solve(context, support)
        mean = network(phi_hat, x)
        if curvature is None:
            return jnp.sum(dist.Normal(mean, NOISE).log_prob(y), -1)
        support_nll = marginal.inner_loss(context, support)
        precision = curvature(support_nll, phi_hat, context.observations(model, support))

        def one_task(phi, x):
            return network(phi[None], x[None])[0]

        jac = jax.vmap(jax.jacrev(one_task))(phi_hat, x)  # (tasks, points, d)
        solved = jax.vmap(precision.solve, in_axes=1, out_axes=1)(jac)  # Ĥ⁻¹ Jᵀ, per point
        cov = jnp.einsum("tnd,tmd->tnm", jac, solved) + NOISE**2 * jnp.eye(x.shape[1])
        return dist.MultivariateNormal(mean, cov).log_prob(y)

    return compute(support, x, y)

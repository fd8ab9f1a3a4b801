"""Hierarchical logistic regression: the smallest model where the Laplace evidence is not exact.

Task j has binary labels y_jn ~ Bernoulli(σ(x_jnᵀ φ_j)), σ the logistic function, with task
weights φ_j ~ N(θ, τ² I) around global weights θ (features,) and a global scale τ; x has an
intercept column. Priors θ ~ N(0, 5² I), τ ~ HalfNormal(2).

What it teaches: the task posterior p(φ_j | y_j, θ, τ) is log-concave but not Gaussian, so the
Laplace evidence log p(y_j | φ̂_j) + log p(φ̂_j | θ) + (d/2) log 2π − ½ log det H_j is an
approximation (``LAPLACE_EXACT = False``), and its error shrinks as the points per task grow
(the likelihood dominates and the posterior becomes Gaussian). MAML's K gradient steps on the
support log-likelihood no longer equal MAP under a fixed Gaussian prior, only locally
(Grant et al., ICLR 2018, §4, via the linearisation of Santos 1996). NUTS on :func:`model` is
the reference; with logits the Hessian is XᵀWX with W = diag(p(1 − p)) ≤ 1/4; ``hbmeta
compare`` chooses MAML's inner step from it at the start of the fit (``ZOO_MODEL.fit``).

Data are simulated from the model with known globals (``TRUE_THETA``, ``TRUE_TAU``) and split
into support and query points per task: ``x: (tasks, points, features)``, ``y: (tasks,
points)`` (int32 labels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.zoo import FitSettings, ZooModel

SUMMARY = "hierarchical logistic regression, simulated; Laplace approximate (Bernoulli tasks)"
GLOBALS = ("theta", "tau")
TASK_SITES = ("phi",)
LAPLACE_EXACT = False

TRUE_THETA = (0.5, 1.5, -1.0)
TRUE_TAU = 1.0


def model(x, y=None):
    """x: (tasks, points, features); y: (tasks, points) labels in {0, 1}."""
    features = x.shape[-1]
    theta = numpyro.sample("theta", dist.Normal(0.0, 5.0).expand([features]).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, tau).expand([features]).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Bernoulli(logits=jnp.sum(x * phi, -1)), obs=y)


def simulate(rng_key, *, num_tasks: int, num_support: int, num_query: int = 0,
             theta=TRUE_THETA, tau: float = TRUE_TAU) -> TaskData:
    """Draw tasks from the model with known globals; x has an intercept column.

    Examples:
        >>> data = simulate(jax.random.PRNGKey(0), num_tasks=3, num_support=4, num_query=2)
        >>> data.support["x"].shape, data.query["y"].shape, data.truth["phi"].shape
        ((3, 4, 3), (3, 2), (3, 3))
    """
    theta = jnp.asarray(theta)
    features = theta.shape[0]
    num_points = num_support + num_query
    key_x, key_phi, key_y = jax.random.split(rng_key, 3)
    x = jax.random.normal(key_x, (num_tasks, num_points, features))
    x = x.at[..., 0].set(1.0)
    phi = theta + tau * jax.random.normal(key_phi, (num_tasks, features))
    logits = jnp.einsum("jnf,jf->jn", x, phi)
    y = jax.random.bernoulli(key_y, jax.nn.sigmoid(logits)).astype(jnp.int32)
    truth = {"theta": theta, "tau": jnp.asarray(tau), "phi": phi}
    return TaskData.from_points({"x": x, "y": y}, num_support, truth=truth)


def load_data(rng_key=None, *, small: bool = False) -> TaskData:
    """The default problem: 20 tasks of 20 support + 20 query points; ``small``: 8 tasks of
    10 + 10 points."""
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    if small:
        return simulate(rng_key, num_tasks=8, num_support=10, num_query=10)
    return simulate(rng_key, num_tasks=20, num_support=20, num_query=20)


ZOO_MODEL = ZooModel(
    name="logistic", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    default_methods=("maml", "laplace", "nuts"),
    # β from the data: the curvature XᵀWX depends on the design and on θ through W.
    fit=FitSettings(maml_step_size=None),
)

"""Hierarchical linear regression: the model where every answer is known in closed form.

Task j has points y_jn = x_jnᵀ φ_j + ε_jn, ε_jn ~ N(0, σ²), and φ_j ~ N(θ, τ² I). Given the
globals (θ, τ, σ) each task's evidence is Gaussian,

    y_j | θ, τ, σ ~ N(X_j θ, σ² I + τ² X_j X_jᵀ),

so the Laplace approximation with a converged (Newton) inner solver is exact, type-II
maximum likelihood can be checked against a direct maximisation of this density, and NUTS
on the full model is the gold standard for full Bayes. It teaches the whole argument of
Grant et al. (ICLR 2018): MAML is empirical Bayes here, with an implicit Gaussian prior.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.zoo import FitSettings, ZooModel

SUMMARY = "hierarchical linear regression, simulated; exact evidence and exact EB known"
GLOBALS = ("theta", "tau", "sigma")
TASK_SITES = ("phi",)
LAPLACE_EXACT = True

# The fixed MAML step of tutorial 01 (K = 5, β = 0.002; β·λ_max(XᵀX/σ²) < 1 at the exact EB
# globals). ``hbmeta compare`` chooses β from the data instead (``ZOO_MODEL.fit``).
FIT = {"maml_steps": 5, "maml_step_size": 0.002}

TRUE_THETA = (1.0, -0.5)
TRUE_TAU = 0.7
TRUE_SIGMA = 0.5


def model(x, y=None):
    """x: (tasks, points, features); y: (tasks, points)."""
    features = x.shape[-1]
    theta = numpyro.sample("theta", dist.Normal(0.0, 10.0).expand([features]).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with tasks(x.shape[0], dim=-2):
        phi = numpyro.sample("phi", dist.Normal(theta, tau).expand([features]).to_event(1))
        with numpyro.plate("points", x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), sigma), obs=y)


def simulate(rng_key, *, num_tasks: int, num_support: int, num_query: int = 0,
             theta=TRUE_THETA, tau: float = TRUE_TAU, sigma: float = TRUE_SIGMA) -> TaskData:
    """Draw tasks from the model with known globals; x has an intercept column."""
    theta = jnp.asarray(theta)
    x, phi, y = _draw(rng_key, theta, jnp.asarray(tau), jnp.asarray(sigma), num_tasks,
                      num_support + num_query)
    truth = {"theta": theta, "tau": jnp.asarray(tau), "sigma": jnp.asarray(sigma), "phi": phi}
    return TaskData.from_points({"x": x, "y": y}, num_support, truth=truth)


@partial(jax.jit, static_argnums=(4, 5))
def _draw(rng_key, theta, tau, sigma, num_tasks: int, num_points: int):
    key_x, key_phi, key_eps = jax.random.split(rng_key, 3)
    x = jax.random.normal(key_x, (num_tasks, num_points, theta.shape[0]))
    x = x.at[..., 0].set(1.0)
    phi = theta + tau * jax.random.normal(key_phi, (num_tasks, theta.shape[0]))
    y = jnp.einsum("jnf,jf->jn", x, phi) + sigma * jax.random.normal(key_eps, x.shape[:2])
    return x, phi, y


def load_data(rng_key=None, *, small: bool = False) -> TaskData:
    """The default problem: 20 tasks (8 when ``small``), 10 support + 10 query points."""
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    return simulate(rng_key, num_tasks=8 if small else 20, num_support=10, num_query=10)


def exact_log_evidence(params, data) -> jnp.ndarray:
    """Σ_j log N(y_j | X_j θ, σ² I + τ² X_j X_jᵀ), per task: shape (tasks,)."""
    x, y = data["x"], data["y"]
    cov = params["sigma"] ** 2 * jnp.eye(x.shape[1]) + params["tau"] ** 2 * jnp.einsum(
        "jnf,jmf->jnm", x, x)
    return dist.MultivariateNormal(x @ params["theta"], cov).log_prob(y)


def exact_task_posterior(params, data):
    """Mean (tasks, features) and covariance (tasks, features, features) of φ_j | y_j."""
    x, y = data["x"], data["y"]
    features = x.shape[-1]
    precision = jnp.einsum("jnf,jng->jfg", x, x) / params["sigma"] ** 2 + jnp.eye(
        features) / params["tau"] ** 2
    cov = jnp.linalg.inv(precision)
    rhs = jnp.einsum("jnf,jn->jf", x, y) / params["sigma"] ** 2 + params["theta"] / params[
        "tau"] ** 2
    return jnp.einsum("jfg,jg->jf", cov, rhs), cov


def exact_type2_ml(data, *, init=None) -> dict:
    """Maximise the closed-form evidence over (θ, log τ, log σ) with SciPy's BFGS on float64
    gradients, independently of the library's handler: the reference for empirical Bayes."""
    import numpy as np

    from numpyro_hbmeta.models._reference import minimise_float64

    features = data["x"].shape[-1]
    start = np.zeros(features + 2) if init is None else np.asarray(init, float)

    def unpack(z):
        return {"theta": z[:features], "tau": jnp.exp(z[features]),
                "sigma": jnp.exp(z[features + 1])}

    with jax.enable_x64(True):
        data64 = {k: jnp.asarray(v, jnp.float64) for k, v in data.items()}
        z = minimise_float64(lambda z: -jnp.sum(exact_log_evidence(unpack(z), data64)), start)
    return {k: jnp.asarray(v) for k, v in unpack(jnp.asarray(z)).items()}


def init_params(rng_key=None) -> dict[str, jnp.ndarray]:
    """Where ``hbmeta compare`` starts MetaEB: θ = 0, τ = σ = 1 (the globals at unconstrained
    0), the point MAML's inner step β = 0.1 / max_j λ_max,j is read off
    (:func:`numpyro_hbmeta.infer.methods.stable_step_size`). From MetaEB's uniform start σ can
    be e⁻² ≈ 0.14, where λ ∝ 1/σ² is 55 times larger and β·λ > 2: the inner loop diverges at
    step 0 (seen on ``hbmeta compare linear --small``). ``rng_key`` is unused: the start is
    deterministic."""
    del rng_key
    return {"theta": jnp.zeros(len(TRUE_THETA)), "tau": jnp.asarray(1.0),
            "sigma": jnp.asarray(1.0)}


ZOO_MODEL = ZooModel(
    name="linear", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    default_methods=("maml", "laplace", "nuts"),
    # β from the data: σ and the design set the support curvature XᵀX/σ².
    fit=FitSettings(maml_steps=5, maml_step_size=None),
    init_params=init_params,
    exact_type2_ml=exact_type2_ml,
)

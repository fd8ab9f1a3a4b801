"""Eight schools: where empirical Bayes collapses onto the boundary τ = 0.

The SAT-coaching experiments of Rubin (1981), analysed in Gelman et al., *Bayesian Data
Analysis* (3rd ed., §5.5): school j reports an estimated effect y_j with a known standard
error σ_j, and

    μ ~ N(0, 5²),  τ ~ HalfCauchy(5),  θ_j ~ N(μ, τ²),  y_j ~ N(θ_j, σ_j²),

with the priors of ArviZ's ``centered_eight`` example. A task is a school (labels A–H), with a
single observation and no query set. The task level is linear-Gaussian, so each school's
evidence is known in closed form,

    y_j | μ, τ ~ N(μ, σ_j² + τ²),

and the Laplace evidence with a converged (Newton) inner solver is exact
(``LAPLACE_EXACT = True``): whatever empirical Bayes does here is the model's doing, not the
approximation's.

What it teaches: type-II maximum likelihood, i.e. MAML/LLAMA-style point estimation of the
globals, drives τ̂ to 0, the boundary of its support. The profile evidence
max_μ Σ_j log N(y_j | μ, σ_j² + τ²) decreases monotonically in τ on this data (measured:
τ̂ = 0, μ̂ = 7.6856, the precision-weighted mean of the y_j, log evidence −29.6742; at τ = 5 it
is −29.99, at τ = 10 −30.89), so the EB fit pools every school to the same effect and reports
no between-school variation at all, while full Bayes (NUTS on :func:`model`) keeps posterior
mass on τ well away from 0. An optimiser in log τ creeps towards −∞ with vanishing
gradients rather than stopping, so τ̂ from ``MetaEB`` is "small", not 0. The centred form is
the one the meta-learning handler needs (φ_j ~ p(φ | θ)); it is also the form in which NUTS
meets Neal's funnel and reports divergences, a second lesson of this model.

Data layout: ``y`` and ``sigma`` are task-major vectors of shape (tasks,) = (8,), the task
plate is at ``dim=-1`` and there is no points plate (one observation per school), so the model
is the textbook NumPyro one; ``sigma`` is data, not a parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.zoo import FitSettings, ZooModel

SUMMARY = "eight schools (Rubin 1981; BDA3 §5.5), real data; exact evidence, EB gives τ̂ = 0"
GLOBALS = ("mu", "tau")
TASK_SITES = ("theta_school",)
LAPLACE_EXACT = True

SCHOOLS = ("A", "B", "C", "D", "E", "F", "G", "H")
EFFECTS = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
STANDARD_ERRORS = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def model(sigma, y=None):
    """sigma: (tasks,) known standard errors; y: (tasks,) estimated effects."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with tasks(sigma.shape[0], dim=-1):
        theta_school = numpyro.sample("theta_school", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta_school, sigma), obs=y)


def load_data(rng_key=None, *, small: bool = False) -> TaskData:
    """The eight schools; real data, so ``rng_key`` and ``small`` (already tiny) are unused.

    Returns:
        ``support = {"sigma": (8,), "y": (8,)}``, no query set, task labels ``A``–``H``.

    Examples:
        >>> data = load_data()
        >>> data.support["y"].shape, data.task_labels[0], data.query is None
        ((8,), 'A', True)
    """
    del rng_key, small
    support = {"sigma": jnp.asarray(STANDARD_ERRORS), "y": jnp.asarray(EFFECTS)}
    return TaskData(support=support, query=None, task_labels=list(SCHOOLS), truth=None)


def exact_log_evidence(params, data) -> jnp.ndarray:
    """log N(y_j | μ, σ_j² + τ²) per school: shape (tasks,). ``params`` holds ``mu``, ``tau``."""
    scale = jnp.sqrt(data["sigma"] ** 2 + params["tau"] ** 2)
    return dist.Normal(params["mu"], scale).log_prob(data["y"])


def profile_mu(tau, data) -> jnp.ndarray:
    """The μ maximising the evidence at fixed τ: the mean of the y_j weighted by 1/(σ_j² + τ²)."""
    weights = 1.0 / (data["sigma"] ** 2 + tau**2)
    return jnp.sum(weights * data["y"]) / jnp.sum(weights)


def exact_task_posterior(params, data):
    """Mean and variance of θ_j | y_j, μ, τ, each (tasks,) (τ > 0; at τ = 0, θ_j = μ)."""
    precision = 1.0 / data["sigma"] ** 2 + 1.0 / params["tau"] ** 2
    mean = (data["y"] / data["sigma"] ** 2 + params["mu"] / params["tau"] ** 2) / precision
    return mean, 1.0 / precision


def exact_type2_ml(data, *, tau_max: float = 100.0) -> dict:
    """Maximise Σ_j log N(y_j | μ, σ_j² + τ²) over μ and τ ∈ [0, ``tau_max``], in float64.

    μ is profiled out in closed form (:func:`profile_mu`); τ by a bounded scalar search, with
    the boundary τ = 0 compared explicitly, because that is where the maximum lies for the
    eight schools. Independent of the library's handler: the reference for empirical Bayes.
    """
    import scipy.optimize

    with jax.enable_x64(True):
        data64 = {k: jnp.asarray(v, jnp.float64) for k, v in data.items() if k in ("y", "sigma")}

        @jax.jit
        def profile(tau):
            params = {"mu": profile_mu(tau, data64), "tau": tau}
            return jnp.sum(exact_log_evidence(params, data64))

        def negative_profile(tau):
            return -float(profile(jnp.asarray(tau, jnp.float64)))

        result = scipy.optimize.minimize_scalar(negative_profile, bounds=(0.0, tau_max),
                                                method="bounded",
                                                options={"xatol": 1e-10})
        tau = 0.0 if negative_profile(0.0) <= result.fun else float(result.x)
        mu = float(profile_mu(jnp.asarray(tau, jnp.float64), data64))
    return {"mu": jnp.asarray(mu), "tau": jnp.asarray(tau)}


ZOO_MODEL = ZooModel(
    name="eight_schools", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    # No query set (one observation per school), so no MAML/LLAMA by default; if asked for
    # on other data, β comes from the curvature 1/σ_j² of each school.
    default_methods=("laplace", "nuts"),
    fit=FitSettings(maml_step_size=None),
    exact_type2_ml=exact_type2_ml,
)

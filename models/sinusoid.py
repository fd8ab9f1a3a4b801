"""Sinusoid regression, MAML's toy problem, as a hierarchical model over network weights.

Task j is y = A_j sin(x − b_j) with amplitude A_j ~ U[0.1, 5], phase b_j ~ U[0, π] and inputs
x ~ U[−5, 5] (Finn et al. 2017, §5.1; Grant et al., ICLR 2018, §5.1). Each task is fitted by a
1-40-40-1 ReLU network whose weights are the task parameters:

    θ ~ N(0, I)                      global network weights, (1761,)
    φ_j ~ N(θ, τ² I)                 task weights, τ = ``TAU`` (fixed)
    y_jn ~ N(f(x_jn; φ_j), σ²)       σ = ``NOISE`` (fixed)

The dense layers are declared with :func:`numpyro_hbmeta.nn.layers.dense_layer`, so
``curvature="kfac"`` (LLAMA) sees them. Layer l computes (a / √d_l) W_l + b_l, the
"NTK" parametrisation: the unit-scale prior above is LeCun's initialisation, and MetaEB's
default start U(−2, 2) gives well-scaled activations; the 1/√d_l scales the layer *input*, so
W_l and b_l are the task parameters themselves, as K-FAC needs. φ_j lays out each layer's
W̄ = [W; b] row-major in layer order (:func:`numpyro_hbmeta.nn.vec.vec_mlp`).

Fixed τ and σ: MAML's and LLAMA's objectives do not involve τ (the inner loop's early stopping
is the prior), and a learnt σ would change the inner step size on the likelihood scale while
training (the step on Σ (f − y)²/2σ² is β; on the mean squared error it is β K / 2σ²), so both
are constants here; ``LAPLACE_EXACT = False`` (the network is non-linear in φ).

Other network sizes and prior scales: :class:`SinusoidNet` (``SinusoidNet((1, 20, 1),
tau=0.1).model``) builds the same model for any ReLU MLP, e.g. one small enough for NUTS over
the task weights. The held-out predictive pieces below (LLAMA's Laplace predictive, the NUTS
reference, calibration metrics) are what ``experiments/sinusoid.py``, ``hbmeta compare
sinusoid`` and tutorial 02 share.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from functools import partial
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

from numpyro_hbmeta.curvature import KFAC, DiagCurvature
from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.posterior import TaskPosterior
from numpyro_hbmeta.infer.precision import as_precision
from numpyro_hbmeta.marginal.meta_marginal import meta_marginal
from numpyro_hbmeta.nn.layers import dense_layer
from numpyro_hbmeta.nn.vec import unvec_mlp
from numpyro_hbmeta.zoo import FitSettings, ZooModel

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

# `hbmeta compare sinusoid` runs the meta-learners only: NUTS over ~19k weights is infeasible
# on a CPU, Laplace-EB needs the dense 1761² Hessian per task, and SVI's global table of 1761
# weights says nothing. The report shows held-out predictive metrics instead
# (:func:`compare_report`); NUTS on the task posterior is in experiments/sinusoid.py.
COMPARE_METHODS: tuple[str, ...] = ("maml", "llama")

# MetaEB settings (``ZOO_MODEL.fit``, read by ``numpyro_hbmeta.infer.methods``). The inner step is
# on the summed NLL Σ (f − y)²/2σ²: β = 0.003 is a step of β·K/2σ² = 0.06 on the mean
# squared error of K = 10 shots (MAML's 0.01 is for the standard parametrisation; here
# hidden weights move the function 1/√40 as much per unit step). Measured on 25 tasks:
# β = 0.01 diverged on held-out tasks after meta-training, β = 0.003 adapted best. With
# other shots K, keep β·K fixed.
#
# PRIOR_PRECISION = 1/(Kβ) is the precision that K steps of size β leave a direction the data
# do not constrain (Santos 1996; Grant et al. 2018, §3.2): the damping of LLAMA's K-FAC, i.e.
# the isotropic prior of its Laplace task posterior. Task draws of EB fits would come from
# the GGN task posterior under MAML's implicit prior (``posterior_curvature``: low rank plus
# diagonal, no 1761² matrix; ~9 s and ~0.7 GB for 1000 draws of 25 tasks), but
# task_draws=False: ``hbmeta compare`` would export 1761 weights × tasks per draw (netCDF,
# a forest plot of 44k rows), and at the fitted globals β·λ_max ≈ 1.0–2.6 per task (GGN
# of the --small fit), where no implicit prior exists, so ``run_eb`` reports the task
# posterior as not formed (``compare_report`` scores held-out tasks with the K-FAC
# predictive instead). The step is
# tuned, not chosen from the data: λ_max of a 1761-weight network's Hessian per task would
# cost 1761 Hessian-vector products per task, and the tuned β adapts best (measured above).
PRIOR_PRECISION = 1.0 / (5 * 0.003)
FIT_SETTINGS = FitSettings(maml_steps=5, maml_step_size=0.003, eb_learning_rate=1e-2,
                           llama_curvature=KFAC(damping=PRIOR_PRECISION), task_draws=False,
                           posterior_curvature="ggn")
# Legacy view of FIT_SETTINGS for existing callers (``sinusoid.FIT["maml_steps"]``).
FIT = {k: getattr(FIT_SETTINGS, k) for k in ("maml_steps", "maml_step_size",
                                              "eb_learning_rate", "llama_curvature",
                                              "task_draws")}


class SinusoidNet(NamedTuple):
    """The sinusoid hierarchical model for any ReLU MLP (NTK parametrisation, as above).

    Attributes:
        sizes: layer widths, input 1 and output 1, e.g. ``(1, 40, 40, 1)``.
        tau: prior scale τ of φ_j ~ N(θ, τ² I).
        noise: observation noise σ.
    """

    sizes: tuple[int, ...] = SIZES
    tau: float = TAU
    noise: float = NOISE

    @property
    def num_params(self) -> int:
        return sum((a + 1) * b for a, b in itertools.pairwise(self.sizes))

    def network(self, phi: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
        """f(x; φ) per task: ``phi`` (tasks, d), ``x`` (tasks, points, 1) -> (tasks, points)."""
        params = unvec_mlp(phi, self.sizes)
        h = x
        last = len(self.sizes) - 2
        for layer in range(len(self.sizes) - 1):
            p = params[f"dense_{layer}"]
            s = dense_layer(f"dense_{layer}", h / math.sqrt(self.sizes[layer]), p["w"], p["b"])
            h = jax.nn.relu(s) if layer < last else s
        return h[..., 0]

    def model(self, x, y=None):
        """x: (tasks, points, 1); y: (tasks, points)."""
        d = self.num_params
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with tasks(x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, self.tau).to_event(1))  # (t, 1, d)
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(self.network(phi[:, 0], x), self.noise), obs=y)

    def init_params(self, rng_key) -> dict[str, jnp.ndarray]:
        """A draw of θ from its prior with zero biases (LeCun's initialisation here)."""
        is_bias = np.concatenate([np.r_[np.zeros(a * b), np.ones(b)]
                                  for a, b in itertools.pairwise(self.sizes)]).astype(bool)
        theta = jax.random.normal(rng_key, (self.num_params,))
        return {"theta": jnp.where(is_bias, 0.0, theta)}


NET = SinusoidNet()


def network(phi: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """f(x; φ) per task: ``phi`` (tasks, 1761), ``x`` (tasks, points, 1) -> (tasks, points)."""
    return NET.network(phi, x)


def model(x, y=None):
    """x: (tasks, points, 1); y: (tasks, points)."""
    NET.model(x, y)


def init_params(rng_key) -> dict[str, jnp.ndarray]:
    """A draw of θ from its prior with zero biases (LeCun's initialisation here)."""
    return NET.init_params(rng_key)


def step_size(shots: int) -> float:
    """The inner step β for ``shots`` support points: β·shots fixed at 0.003 × 10."""
    return FIT_SETTINGS.maml_step_size * 10 / shots


# -- data ---------------------------------------------------------------------------------
def simulate(rng_key, *, num_tasks: int, shots: int, num_query: int,
             noise: float = 0.0) -> TaskData:
    """``num_tasks`` sinusoids, ``shots`` support and ``num_query`` query points each.

    With ``noise`` > 0 the observations are y = A sin(x − b) + noise·ε, ε ~ N(0, 1) (the
    model's own likelihood when ``noise = NOISE``); the noise-free values are
    :func:`true_function` of ``truth``. The default 0 is MAML's noise-free benchmark.

    Examples:
        >>> data = simulate(jax.random.PRNGKey(0), num_tasks=3, shots=5, num_query=7)
        >>> data.support["x"].shape, data.query["y"].shape
        ((3, 5, 1), (3, 7))
    """
    amplitude, phase, x = _draw(rng_key, num_tasks, shots + num_query)
    y = amplitude[:, None] * jnp.sin(x[..., 0] - phase[:, None])
    if noise:
        y = y + noise * jax.random.normal(jax.random.fold_in(rng_key, 1), y.shape, y.dtype)
    return TaskData(
        support={"x": x[:, :shots], "y": y[:, :shots]},
        query={"x": x[:, shots:], "y": y[:, shots:]},
        task_labels=[f"task{j}" for j in range(num_tasks)],
        truth={"amplitude": amplitude, "phase": phase},
    )


def true_function(truth: dict[str, Any], x: jnp.ndarray) -> jnp.ndarray:
    """A_j sin(x − b_j): ``truth`` of :func:`simulate`, x (tasks, points, 1) -> (tasks, points)."""
    amplitude, phase = jnp.asarray(truth["amplitude"]), jnp.asarray(truth["phase"])
    return amplitude[:, None] * jnp.sin(jnp.asarray(x)[..., 0] - phase[:, None])


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


# -- curvature ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiagGGN:
    """Diagonal Gauss–Newton/Fisher of the task negative log-likelihood, diag(JᵀΛJ) + δ.

    For a ReLU network with a Normal likelihood this *is* the diagonal of the Hessian almost
    everywhere: f is piecewise linear in any single weight, so ∂²f/∂φ_i² = 0 and the
    residual term of the Hessian has a zero diagonal. Unlike ``curvature="diag"`` (d batched
    Hessian-vector products) it costs n vector-Jacobian products (n points per task), and
    the damping δ keeps it positive where a weight has no gradient (a dead ReLU unit).
    Use as ``curvature=DiagGGN(damping=δ)`` with ``objective="llama"``.

    Args:
        damping: δ > 0, added to every diagonal entry (an isotropic prior precision).
    """

    damping: float = 1e-3
    likelihood_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"DiagGGN: damping must be positive, got {self.damping!r}")

    def __call__(self, loss, phi: jnp.ndarray, observations=None) -> DiagCurvature:
        if observations is None:
            raise ValueError("DiagGGN reads the model's observation sites: call it as "
                             "build(loss, phi, observations) (meta_marginal does)")
        w = observations.whitened_jacobian(phi)  # (tasks, n, d)
        return DiagCurvature(jnp.sum(w**2, -2) + self.damping)


# -- held-out predictives -----------------------------------------------------------------
class Predictive(NamedTuple):
    """A per-task predictive over functions at inputs x, and of observations y = f + σε.

    Attributes:
        mean: E f(x), (tasks, points).
        function_cov: Cov f(x), (tasks, points, points); zeros for a point prediction.
        function_draws: draws of f(x), (num_samples, tasks, points) (may be empty).
        noise: σ.
        mixture: the predictive of y is the mixture of N(f_s(x), σ²) over ``function_draws``
            (NUTS), not the Gaussian N(mean, function_cov + σ²I) (MAML, Laplace).
    """

    mean: jnp.ndarray
    function_cov: jnp.ndarray
    function_draws: jnp.ndarray
    noise: float
    mixture: bool = False

    def select(self, tasks: Any = slice(None), points: Any = slice(None)) -> Predictive:
        """The predictive of some tasks at some points (slices or index arrays)."""
        return self._replace(mean=self.mean[tasks][:, points],
                             function_cov=self.function_cov[tasks][:, points][:, :, points],
                             function_draws=self.function_draws[:, tasks][:, :, points])

    def log_lik(self, y: jnp.ndarray) -> jnp.ndarray:
        """Joint log predictive density of each task's y (tasks,) (Gaussian predictives)."""
        if self.mixture:
            per_draw = jnp.sum(norm.logpdf(y, self.function_draws, self.noise), -1)
            return logsumexp(per_draw, 0) - math.log(per_draw.shape[0])
        cov = self.function_cov + self.noise**2 * jnp.eye(self.mean.shape[-1])
        return dist.MultivariateNormal(self.mean, cov).log_prob(y)

    def pointwise_log_lik(self, y: jnp.ndarray) -> jnp.ndarray:
        """log p(y_n | support) point by point (the marginal at each x_n), (tasks, points)."""
        if self.mixture:
            per_draw = norm.logpdf(y, self.function_draws, self.noise)
            return logsumexp(per_draw, 0) - math.log(per_draw.shape[0])
        return norm.logpdf(y, self.mean, self.y_sd)

    @property
    def function_sd(self) -> jnp.ndarray:
        """sd of f(x) (tasks, points)."""
        if self.mixture:
            return jnp.std(self.function_draws, 0)
        return jnp.sqrt(jnp.clip(jnp.diagonal(self.function_cov, axis1=-2, axis2=-1), 0.0))

    @property
    def y_sd(self) -> jnp.ndarray:
        """sd of y(x) = f(x) + σε (tasks, points)."""
        return jnp.sqrt(self.function_sd**2 + self.noise**2)

    def function_interval(self, level: float = 0.9) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Central ``level`` band of f(x): draw quantiles (mixture) or mean ± z·sd."""
        if self.mixture:
            tail = (1 - level) / 2
            return tuple(jnp.quantile(self.function_draws, jnp.array([tail, 1 - tail]), 0))
        z = norm.ppf(0.5 + level / 2)
        return self.mean - z * self.function_sd, self.mean + z * self.function_sd

    def interval(self, level: float = 0.9) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Central ``level`` interval of y(x); for a mixture its exact quantiles (bisection
        on the mixture CDF, 60 halvings of the bracket mean ± 10·sd)."""
        tail = (1 - level) / 2
        if not self.mixture:
            z = norm.ppf(1 - tail)
            return self.mean - z * self.y_sd, self.mean + z * self.y_sd

        def quantile(p):
            def cdf(q):
                return jnp.mean(norm.cdf((q - self.function_draws) / self.noise), 0)

            def halve(_, bracket):
                low, high = bracket
                mid = 0.5 * (low + high)
                below = cdf(mid) < p
                return jnp.where(below, mid, low), jnp.where(below, high, mid)

            start = (self.mean - 10 * self.y_sd, self.mean + 10 * self.y_sd)
            low, high = jax.lax.fori_loop(0, 60, halve, start)
            return 0.5 * (low + high)

        return quantile(tail), quantile(1 - tail)


def laplace_predictive(params, support, x, *, inner, curvature=None, net: SinusoidNet = NET,
                       rng_key=None, num_samples: int = 0) -> Predictive:
    """MAML's plug-in or LLAMA's linearised Laplace predictive at inputs ``x`` (tasks, points, 1).

    φ̂_j = inner(θ, support_j). With ``curvature=None``, the point prediction f(x; φ̂_j)
    (MAML). With a curvature builder (``KFAC(damping=δ)``, ``GGN(damping=δ)``,
    :class:`DiagGGN`), LLAMA's Laplace task posterior N(φ̂_j, Ĥ_j⁻¹), Ĥ_j the curvature of
    the support negative log-likelihood at φ̂_j plus δI (the damping acts as the isotropic
    prior precision 1/τ²; Grant et al., ICLR 2018, §4), pushed through the network
    linearised at φ̂_j (the GLM predictive; Immer et al. 2021):

        f(x) ~ N(f(x; φ̂_j), J_j Ĥ_j⁻¹ J_jᵀ),   J_j = ∂f(x; φ)/∂φ at φ̂_j,

    with ``num_samples`` draws f(x; φ̂_j) + J_j S_j z, S_j S_jᵀ = Ĥ_j⁻¹, z ~ N(0, I_d). The
    posterior is ``TaskPosterior(φ̂, as_precision(Ĥ))`` in the curvature's own structure
    (Kronecker, diagonal, low rank plus diagonal) and the predictive its
    :meth:`~numpyro_hbmeta.infer.posterior.TaskPosterior.linearised_predictive`: no d × d matrix
    and no Jacobian across tasks is formed. Ĥ_j is the curvature as given (δ its prior
    part), not the implicit-prior posterior of
    :func:`~numpyro_hbmeta.infer.posterior.laplace_task_posterior` (which would add MAML's
    implicit prior to the damping δ = 1/τ² that already stands for it).

    Args:
        params: constrained globals, ``{"theta": (d,)}``.
        support: ``{"x", "y"}`` of the support set.
        x: the inputs to predict at, (tasks, points, 1).
        inner: the inner solver that gives φ̂ (``TruncatedGD``).
        curvature: ``None`` or a curvature builder.
        net: the network (default the zoo's 1-40-40-1).
        rng_key: key of the function draws.
        num_samples: number of function draws.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    mean, cov, draws = _laplace_predictive(dict(params), dict(support), jnp.asarray(x),
                                           rng_key, inner=inner, curvature=curvature, net=net,
                                           num_samples=int(num_samples))
    return Predictive(mean, cov, draws, net.noise)


@partial(jax.jit, static_argnames=("inner", "curvature", "net", "num_samples"))
def _laplace_predictive(params, support, x, rng_key, *, inner, curvature, net: SinusoidNet,
                        num_samples: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(mean, covariance, draws) of :func:`laplace_predictive`; jitted once per setting and
    shape (the data are arguments, not captured)."""
    marginal = meta_marginal(net.model, inner=inner, objective="maml")
    context = context_at(net.model, params, support)
    phi_hat, _ = marginal.solve(context, support)

    def network_at_x(phi):
        return net.network(phi, x)

    if curvature is None:
        mean = network_at_x(phi_hat)
        num_tasks, num_points = mean.shape
        return (mean, jnp.zeros((num_tasks, num_points, num_points), mean.dtype),
                jnp.broadcast_to(mean, (num_samples, num_tasks, num_points)))
    precision = as_precision(curvature(marginal.inner_loss(context, support), phi_hat,
                                       context.observations(net.model, support)))
    return tuple(TaskPosterior(phi_hat, precision).linearised_predictive(
        network_at_x, rng_key=rng_key, num_samples=num_samples))


def predictive_log_lik(params, support, query, *, inner, curvature=None,
                       net: SinusoidNet = NET) -> jnp.ndarray:
    """Held-out log-likelihood of each task's query set given its support set, (tasks,).

    With ``curvature=None``, MAML's plug-in predictive at φ̂_j = inner(θ, support_j):
    Σ_n log N(y_n | f(x_n; φ̂_j), σ²). With a curvature builder (e.g. ``GGN(damping=δ)`` or
    ``KFAC(damping=δ)`` from :mod:`numpyro_hbmeta.curvature`), LLAMA's Laplace task posterior
    N(φ̂_j, Ĥ_j⁻¹) with the linearised (GLM) predictive (:func:`laplace_predictive`)

        log N(y | f(x; φ̂_j), σ² I + J_j Ĥ_j⁻¹ J_jᵀ),   J_j = ∂f(x; φ)/∂φ at φ̂_j,

    x, y the query points (Immer et al. 2021 on why linearise).

    Args:
        params: constrained globals, ``{"theta": (d,)}``.
        support: ``{"x", "y"}`` of the support set; query: the same for the query set.
        inner: the inner solver that gives φ̂ (``TruncatedGD``).
        curvature: ``None`` or a curvature builder.
        net: the network (default the zoo's 1-40-40-1).
    """
    predictive = laplace_predictive(params, support, query["x"], inner=inner,
                                    curvature=curvature, net=net)
    return predictive.log_lik(jnp.asarray(query["y"]))


class NutsReference(NamedTuple):
    """NUTS draws of the task weights given the support set at fixed globals.

    Attributes:
        phi: (draws, tasks, d), chains stacked.
        divergences: number of divergent transitions.
        max_r_hat: largest split R-hat over all task weights.
        min_ess: smallest bulk effective sample size over the task weights where it is
            defined (positive).
        wall_time: seconds, compilation included.
        undefined_ess: number of weights whose ESS estimate broke down (ArviZ returned a
            non-positive or non-finite value, e.g. a weight the chains barely move).
    """

    phi: jnp.ndarray
    divergences: int
    max_r_hat: float
    min_ess: float
    wall_time: float
    undefined_ess: int = 0


def nuts_task_posterior(net: SinusoidNet, theta: jnp.ndarray, support, rng_key, *,
                        num_warmup: int = 500, num_samples: int = 500, num_chains: int = 2,
                        progress_bar: bool = False) -> NutsReference:
    """The exact task posterior p(φ_j | support_j, θ) ∝ N(φ_j; θ, τ²I) Π_n N(y_n; f(x_n; φ_j), σ²)
    by NUTS: the zoo model with θ conditioned on, all tasks in one run (they are independent
    given θ, so the joint posterior is the product). Chains are vectorised.

    This is the posterior that LLAMA's Laplace approximation N(φ̂_j, (F_j + I/τ²)⁻¹)
    approximates when its damping is δ = 1/τ² (:func:`laplace_predictive`).
    """
    conditioned = handlers.condition(net.model, data={"theta": jnp.asarray(theta)})
    mcmc = MCMC(NUTS(conditioned), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=num_chains, chain_method="vectorized", progress_bar=progress_bar)
    start = time.perf_counter()
    mcmc.run(rng_key, extra_fields=("diverging",), **support)
    draws = mcmc.get_samples(group_by_chain=True)["phi"][:, :, :, 0]  # (chains, draws, t, d)
    jax.block_until_ready(draws)
    elapsed = time.perf_counter() - start
    import arviz as az  # rank-normalised bulk ESS and R-hat (Vehtari et al. 2021)

    dataset = az.convert_to_dataset({"phi": np.asarray(draws)})
    divergences = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    ess = np.asarray(az.ess(dataset)["phi"])
    defined = np.isfinite(ess) & (ess > 0)
    return NutsReference(jnp.reshape(draws, (-1, *draws.shape[2:])), divergences,
                         float(az.rhat(dataset)["phi"].max()),
                         float(ess[defined].min()) if defined.any() else float("nan"), elapsed,
                         int(np.sum(~defined)))


def nuts_predictive(net: SinusoidNet, phi_draws: jnp.ndarray, x: jnp.ndarray) -> Predictive:
    """The posterior predictive of NUTS draws (draws, tasks, d) at x (tasks, points, 1): a
    mixture of N(f(x; φ_s), σ²) over the draws (nothing linearised)."""
    f = jax.jit(jax.vmap(net.network, in_axes=(0, None)))(phi_draws, jnp.asarray(x))
    mean = jnp.mean(f, 0)
    centred = f - mean
    cov = jnp.einsum("stn,stm->tnm", centred, centred) / f.shape[0]
    return Predictive(mean, cov, f, net.noise, mixture=True)


def predictive_metrics(predictive: Predictive, y: jnp.ndarray, f_true: jnp.ndarray, *,
                       level: float = 0.9) -> dict[str, float]:
    """Calibration and accuracy of a predictive on held-out points, averaged over points.

    Returns:
        ``mse``: mean of (E f(x) − f_true(x))², the error of the predictive mean against the
        noise-free function; ``log_lik``: mean of log p(y_n | support) (per point);
        ``coverage``: fraction of y inside the central ``level`` predictive interval of y;
        ``f_coverage``: fraction of f_true(x) inside the ``level`` band of f (0 for a point
        prediction); ``sd``: mean predictive sd of y.
    """
    y, f_true = jnp.asarray(y), jnp.asarray(f_true)
    low, high = predictive.interval(level)
    f_low, f_high = predictive.function_interval(level)
    return {
        "mse": float(jnp.mean((predictive.mean - f_true) ** 2)),
        "log_lik": float(jnp.mean(predictive.pointwise_log_lik(y))),
        "coverage": float(jnp.mean((y >= low) & (y <= high))),
        "f_coverage": float(jnp.mean((f_true >= f_low) & (f_true <= f_high))),
        "sd": float(jnp.mean(predictive.y_sd)),
    }


# -- hbmeta compare -----------------------------------------------------------------------
def compare_report(results, data: TaskData, out, *, small: bool = False
                   ) -> tuple[str, str, list[str]]:
    """``hbmeta compare sinusoid``'s table: held-out predictive metrics, not 1761 globals.

    Scores each fitted method on fresh simulated tasks (as many as ``data`` has, same shots,
    25 query points each): MAML with its plug-in predictive, LLAMA with its linearised K-FAC
    Laplace predictive (damping ``PRIOR_PRECISION``), and θ̂ itself without adaptation; draws
    a figure of LLAMA's function draws on three held-out tasks.

    Returns:
        ``(caption, markdown table, extra report lines)``; ``small`` is unused (the test
        tasks follow ``data``'s size).
    """
    del small
    from numpyro_hbmeta.inner import TruncatedGD
    from numpyro_hbmeta.output import plots  # outputs layer, only needed here
    from numpyro_hbmeta.output.report import markdown_table

    num_tasks, shots = data.support["y"].shape
    test = simulate(jax.random.PRNGKey(20180330), num_tasks=num_tasks, shots=shots,
                    num_query=25)
    f_true = true_function(test.truth, test.query["x"])
    inner = TruncatedGD(FIT_SETTINGS.maml_steps, step_size(shots))
    header = ["method", "predictive", "query MSE", "log-lik / point", "90% coverage of y",
              "90% coverage of f", "mean predictive sd"]
    rows, lines = [], []
    for result in results:
        params = {"theta": jnp.asarray(result.samples["theta"])[0, 0]}
        llama = result.method == "llama"
        predictives = [("plug-in at φ̂ (no adaptation)", TruncatedGD(0, inner.step_size),
                        None)] if result.method == "maml" else []
        predictives.append(("linearised Laplace, K-FAC" if llama else "plug-in at φ̂", inner,
                            FIT_SETTINGS.llama_curvature if llama else None))
        for label, solver, curvature in predictives:
            predictive = laplace_predictive(params, test.support, test.query["x"],
                                            inner=solver, curvature=curvature,
                                            num_samples=200)
            m = predictive_metrics(predictive, test.query["y"], f_true)
            rows.append([result.method, label, *(f"{m[k]:.3f}" for k in (
                "mse", "log_lik", "coverage", "f_coverage", "sd"))])
            if llama and solver is inner:
                lines += _compare_figure(params, test, inner, out, plots)
    caption = (f"Held-out predictive on {num_tasks} new tasks ({shots} support, 25 query "
               "points each; noise-free y, so coverage of y is generous): the globals are "
               "1761 network weights, whose table says nothing.")
    return caption, markdown_table(header, rows), lines


def _compare_figure(params, test: TaskData, inner, out, plots) -> list[str]:
    grid = jnp.broadcast_to(jnp.linspace(*INPUT, 100)[None, :, None],
                            (test.support["x"].shape[0], 100, 1))
    predictive = laplace_predictive(params, test.support, grid, inner=inner,
                                    curvature=FIT_SETTINGS.llama_curvature,
                                    num_samples=200)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for task, ax in enumerate(axes):
        plots.predictive_bands(grid[task, :, 0], predictive.function_draws[:, task],
                               test.support["y"][task], x_obs=test.support["x"][task, :, 0],
                               label="LLAMA f(x)", title=f"held-out task {task}", ax=ax)
        ax.plot(grid[task, :, 0], true_function(test.truth, grid)[task], color="black",
                lw=1, label="true function")
        ax.legend(fontsize="x-small")
    path = plots.save(figure, out / "functions.png")
    plt.close(figure)
    return ["", "LLAMA's K-FAC Laplace posterior over functions on three held-out tasks "
            "(median, 50% and 90% bands of f; support points; true function):", "",
            f"![functions]({path.name})"]


ZOO_MODEL = ZooModel(
    name="sinusoid", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    default_methods=COMPARE_METHODS, compare_methods=COMPARE_METHODS, fit=FIT_SETTINGS,
    init_params=init_params, compare_report=compare_report,
)

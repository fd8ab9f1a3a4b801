# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.16.0
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MAML is empirical Bayes
#
# Grant, Finn, Levine, Darrell and Griffiths (ICLR 2018, *Recasting Gradient-Based
# Meta-Learning as Hierarchical Bayes*) read model-agnostic meta-learning (MAML) as a
# statement about a hierarchical model. This tutorial checks that reading, line by line, on
# the one hierarchical model where every quantity has a closed form: a hierarchical linear
# regression. We will
#
# 1. write the model and its exact marginal likelihood (the *evidence*) per task;
# 2. see what MAML's inner loop (a few gradient steps started at the global parameter θ)
#    computes, and read it as a point estimate of each task's posterior;
# 3. make the prior that early-stopped gradient descent imposes explicit (Santos 1996), and
#    check to machine precision that MAML's adapted parameters are the MAP under that prior;
# 4. fit θ three ways (MAML, exact empirical Bayes, NUTS) and compare them.
#
# Everything runs in float64: the identities in step 3 are exact, and we want to see them hold
# to ~1e-12, not to float32's ~1e-6.

# %%
import os
import time
from pathlib import Path

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from numpyro.infer.util import log_density

import numpyro_hbmeta as hbm
from numpyro_hbmeta import baselines, plots
from numpyro_hbmeta.models import linear

numpyro.enable_x64()  # before any array is made: every computation below is float64

SMALL = os.environ.get("HBMETA_TUTORIAL_SMALL") == "1"
OUT = Path(os.environ.get("HBMETA_TUTORIAL_OUT", "tutorial_outputs")) / (
    "01_maml_is_empirical_bayes")
OUT.mkdir(parents=True, exist_ok=True)
START = time.perf_counter()

# NUTS sizes: a quick look in small mode, a proper run otherwise (one chain either way).
NUTS_WARMUP, NUTS_SAMPLES = (200, 300) if SMALL else (500, 1500)


def show(figure, name):
    """Save a pyplot figure under OUT and display it."""
    figure.savefig(OUT / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.show()


# %% [markdown]
# ## 1. The model and its exact evidence
#
# Task $j = 1, \dots, J$ has $n$ points $(x_{jn}, y_{jn})$ with $x_{jn} \in \mathbb{R}^2$ (an
# intercept and one covariate) and its own regression coefficients $\phi_j$:
#
# $$\phi_j \mid \theta, \tau \sim \mathcal N(\theta, \tau^2 I), \qquad
#   y_{jn} \mid \phi_j, \sigma \sim \mathcal N(x_{jn}^\top \phi_j, \sigma^2).$$
#
# The globals are the population mean $\theta$, the between-task scale $\tau$ and the noise
# $\sigma$. In NumPyro (this is `numpyro_hbmeta.models.linear.model`; the `hbm.tasks` plate is
# an ordinary `numpyro.plate` that marks the task level):
#
# ```python
# def model(x, y=None):                      # x: (tasks, points, 2), y: (tasks, points)
#     theta = numpyro.sample("theta", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
#     tau = numpyro.sample("tau", dist.HalfNormal(2.0))
#     sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
#     with hbm.tasks(x.shape[0], dim=-2):
#         phi = numpyro.sample("phi", dist.Normal(theta, tau).expand([2]).to_event(1))
#         with numpyro.plate("points", x.shape[1], dim=-1):
#             numpyro.sample("y", dist.Normal(jnp.sum(x * phi, -1), sigma), obs=y)
# ```
#
# We simulate from it with $\theta = (1, -0.5)$, $\tau = 0.7$, $\sigma = 0.5$: 20 tasks (8 in
# small mode), each with 10 *support* points (used to adapt to the task) and 10 *query*
# points (used to score the adaptation), the split meta-learning uses.

# %%
data = linear.load_data(jax.random.PRNGKey(0), small=SMALL)
support, query, all_data = data.support, data.query, data.all_data()
num_tasks = support["x"].shape[0]
print(f"{num_tasks} tasks; support x {support['x'].shape}, query x {query['x'].shape}, "
      f"dtype {support['x'].dtype}")
print("truth:", {k: np.round(np.asarray(data.truth[k]), 3).tolist() for k in linear.GLOBALS})

# %% [markdown]
# Given the globals, $\phi_j$ can be integrated out in closed form: $y_j = X_j \phi_j +
# \varepsilon_j$ is a linear function of two independent Gaussians, so
#
# $$p(y_j \mid \theta, \tau, \sigma) = \mathcal N\!\left(y_j \;\middle|\; X_j \theta,\;
#   \sigma^2 I + \tau^2 X_j X_j^\top\right).$$
#
# **Empirical Bayes** (type-II maximum likelihood) estimates the globals by maximising this
# evidence summed over tasks,
#
# $$(\hat\theta, \hat\tau, \hat\sigma) = \arg\max_{\theta, \tau, \sigma}
#   \sum_j \log p(y_j \mid \theta, \tau, \sigma).$$
#
# The zoo module gives the evidence (`linear.exact_log_evidence`) and its maximiser by SciPy's
# BFGS in float64 (`linear.exact_type2_ml`), written independently of the library's handler.
# The library computes the same evidence with `hbm.meta_marginal(model, inner=hbm.Newton(),
# objective="laplace")`: Newton's method finds each task's posterior mode $\hat\phi_j$, and the
# Laplace approximation
# $\log p(y_j \mid \hat\phi_j) + \log p(\hat\phi_j \mid \theta, \tau) + \tfrac d2 \log 2\pi
# - \tfrac12 \log\det H_j$ is *exact* here because the task posterior is Gaussian. The marginal
# is a NumPyro model over the globals only, so NumPyro's `log_density` evaluates it: it must
# equal the closed-form evidence plus the log prior of the globals. In float64 the two
# computations differ only by rounding (a few 1e-14 relative), so we assert a relative
# tolerance of 1e-10.

# %%
exact_eb = linear.exact_type2_ml(all_data)
print("exact type-II ML:", {k: np.round(np.asarray(v), 4).tolist() for k, v in exact_eb.items()})

laplace_marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton(), objective="laplace")
# jit: evaluated eagerly, every small op of the Newton solve would be compiled on its own.
log_joint = jax.jit(lambda params: log_density(laplace_marginal, (all_data,), {}, params)[0])(
    exact_eb)
log_prior = (dist.Normal(0.0, 10.0).log_prob(exact_eb["theta"]).sum()
             + dist.HalfNormal(2.0).log_prob(exact_eb["tau"])
             + dist.HalfNormal(2.0).log_prob(exact_eb["sigma"]))
closed_form = linear.exact_log_evidence(exact_eb, all_data).sum() + log_prior
print(f"Laplace marginal {float(log_joint):.10f}  closed form {float(closed_form):.10f}")
assert np.isclose(log_joint, closed_form, rtol=1e-10, atol=0.0)

# %% [markdown]
# ## 2. MAML's inner loop is a point estimate of the task posterior
#
# MAML (Finn et al. 2017) adapts to task $j$ by $K$ steps of gradient descent with step size
# $\beta$ on the support negative log-likelihood, *started at the global parameter*:
#
# $$\phi_j^{(0)} = \theta, \qquad
#   \phi_j^{(k+1)} = \phi_j^{(k)} - \beta \nabla \ell_j(\phi_j^{(k)}), \qquad
#   \ell_j(\phi) = -\log p(y^{\text{support}}_j \mid \phi, \sigma)
#   = \frac{\lVert y_j - X_j \phi \rVert^2}{2\sigma^2} + \text{const},$$
#
# and scores the adapted $\hat\phi_j = \phi_j^{(K)}$ on the query points. Its meta-objective,
# maximised over $\theta$, is
#
# $$\mathcal L_{\text{MAML}}(\theta) = \sum_j \log p\big(y^{\text{query}}_j \mid
#   \hat\phi_j(\theta)\big).$$
#
# Compare with empirical Bayes, which scores the query points by the *posterior predictive*
# $\int p(y^{\text{query}}_j \mid \phi)\, p(\phi \mid y^{\text{support}}_j, \theta)\, d\phi$.
# MAML replaces that integral by the integrand at one point, $\hat\phi_j$: the task posterior
# collapsed onto a point estimate. That is Grant et al.'s reading (§3): MAML is empirical
# Bayes in which each task's marginal likelihood is approximated crudely, by the likelihood at
# a point estimate. Two questions remain: which posterior is $\hat\phi_j$ the mode of, and
# under which prior? Note that the model's prior $\mathcal N(\theta, \tau^2 I)$ appears
# nowhere in the inner loop: only its mean $\theta$ (the starting point) does.
#
# In the library, `hbm.TruncatedGD(K, β)` is this inner loop and `objective="maml"` this
# meta-objective. The marginal records $\hat\phi_j$ as a deterministic site under the task
# site's own name, `phi`, so we can read it off a trace and check it against five lines of
# hand-written gradient descent. We evaluate everything at the exact EB globals and use the
# zoo's MAML settings (`linear.FIT`: $K = 5$, $\beta = 0.002$).

# %%
K, BETA = linear.FIT["maml_steps"], linear.FIT["maml_step_size"]
maml_inner = hbm.TruncatedGD(K, BETA)
maml_marginal = hbm.meta_marginal(linear.model, inner=maml_inner, objective="maml")
phi_maml = jax.jit(lambda params: log_density(maml_marginal, (support, query), {}, params)[1][
    "phi"]["value"])(exact_eb)[:, 0, :]  # (tasks, 1, 2) -> (tasks, 2)


@jax.jit
def gradient_descent(theta, sigma, x, y, num_steps, step_size):
    """K steps of GD on ||y - X phi||^2 / (2 sigma^2) from theta, every task at once."""
    def step(_, phi):
        residual = jnp.einsum("jnf,jf->jn", x, phi) - y
        return phi - step_size * jnp.einsum("jnf,jn->jf", x, residual) / sigma**2
    phi0 = jnp.broadcast_to(theta, (x.shape[0], theta.shape[0]))
    return jax.lax.fori_loop(0, num_steps, step, phi0)


phi_by_hand = gradient_descent(exact_eb["theta"], exact_eb["sigma"], support["x"],
                               support["y"], K, BETA)
print("max |library - hand-written| =", float(jnp.max(jnp.abs(phi_maml - phi_by_hand))))
assert np.allclose(phi_maml, phi_by_hand, rtol=1e-12, atol=1e-12)

# %% [markdown]
# The two agree to rounding (both are the same float64 arithmetic in a different order; we
# allow 1e-12).
#
# ## 3. The implicit prior, made explicit
#
# Santos (1996), used by Grant et al. (§3.2, eq. 5–6): for a quadratic loss with Hessian
# $H = O \Lambda O^\top$ and minimiser $\phi^\star$, gradient descent from $\theta$ contracts
# the error by $(I - \beta H)$ per step, so
# $\phi^{(K)} - \phi^\star = (I - \beta H)^K (\theta - \phi^\star)$. The MAP under a Gaussian
# prior $\mathcal N(\theta, Q)$ solves $(H + Q^{-1})\phi = H\phi^\star + Q^{-1}\theta$, i.e.
# $\phi_{\text{MAP}} - \phi^\star = (I + QH)^{-1}(\theta - \phi^\star)$. Both are the same
# point for every $\theta$ and $\phi^\star$ exactly when $Q$ shares the eigenvectors $O$ and, per
# eigenvalue, $(1 - \beta\lambda_i)^K = 1/(1 + q_i \lambda_i)$:
#
# $$Q = O\, \operatorname{diag}(q)\, O^\top, \qquad
#   q_i = \frac{(1 - \beta\lambda_i)^{-K} - 1}{\lambda_i}
#   \quad (\beta\lambda_i < 1).$$
#
# So **K steps of size β from θ are the MAP estimate under the prior $\mathcal N(\theta, Q)$**:
# the early stopping *is* a Gaussian prior centred at θ. Three properties to keep in mind:
#
# * $q_i \ge K\beta$, with $q_i \to K\beta$ as $\lambda_i \to 0$: along directions the support
#   data barely constrain, the prior has variance $K\beta$, so $K\beta$ plays the role of
#   $\tau^2$.
# * $q_i$ grows without bound as $\beta\lambda_i \to 1$: along well-determined directions gradient
#   descent has essentially reached the least-squares fit, i.e. the prior is flat there.
# * $Q$ depends on the task's own design ($H_j = X_j^\top X_j / \sigma^2$): unlike
#   $\mathcal N(\theta, \tau^2 I)$ the implicit prior is different for every task, and it is
#   not a prior in the usual sense: it is set by the data's curvature. For $\beta\lambda_i \ge 1$
#   gradient descent oscillates or diverges and no Gaussian prior reproduces it.
#
# `hbm.implicit_prior(model, params, support, inner)` returns this prior as a NumPyro
# `MultivariateNormal`, one per task. With it we can write the MAP in closed form (the usual
# Gaussian posterior mode) and compare it with MAML's $\hat\phi_j$:
#
# $$\phi_{\text{MAP}, j} = \big(X_j^\top X_j/\sigma^2 + Q_j^{-1}\big)^{-1}
#   \big(X_j^\top y_j/\sigma^2 + Q_j^{-1}\theta\big).$$
#
# **Tolerance.** The identity is exact algebra; numerically, both sides are float64
# computations of size-2 systems whose condition number here is below ~10, so they should agree
# to ~1e-14. We assert `1e-8`: six orders above rounding, yet far below anything a real error
# would cause (one gradient step too many or too few moves $\hat\phi_j$ by
# $\beta\lVert\nabla\ell_j\rVert \approx 10^{-2}$; using $K-1$ in $q_i$ by ~1e-2 as well).

# %%
def map_under_prior(prior, sigma, x, y):
    """Mode of the Gaussian posterior of each task's phi under the prior N(loc, cov)."""
    precision = jnp.einsum("jnf,jng->jfg", x, x) / sigma**2 + prior.precision_matrix
    rhs = (jnp.einsum("jnf,jn->jf", x, y) / sigma**2
           + jnp.einsum("jfg,jg->jf", prior.precision_matrix, prior.loc))
    return jnp.linalg.solve(precision, rhs[..., None])[..., 0]


# The model and the inner solver are static (hashable) arguments; jit compiles the whole
# computation once per (K, beta) instead of op by op.
implicit_prior = jax.jit(hbm.implicit_prior, static_argnums=(0, 3))
implicit = implicit_prior(linear.model, exact_eb, support, maml_inner)
print("implicit prior: batch shape", implicit.batch_shape, "event shape", implicit.event_shape)
phi_map = map_under_prior(implicit, exact_eb["sigma"], support["x"], support["y"])
gap = float(jnp.max(jnp.abs(phi_map - phi_maml)))
print(f"max |MAP under implicit prior - MAML phi_hat| = {gap:.2e}")
assert gap < 1e-8, gap

# %% [markdown]
# The identity holds for every $K$ and $\beta$ with $\beta\lambda_{\max} < 1$, not only the
# zoo's setting. The cell below sweeps a grid of both, for every task, with the same `1e-8`
# tolerance (the library's prior on one side, hand-written gradient descent on the other).

# %%
STEPS = (1, 4, 16)
STEP_SIZES = (0.002, 0.005, 0.01)
hessians = jnp.einsum("jnf,jng->jfg", support["x"], support["x"]) / exact_eb["sigma"] ** 2
lambda_max = float(jnp.linalg.eigvalsh(hessians).max())
print(f"largest support-loss curvature over tasks: lambda_max = {lambda_max:.1f}, "
      f"so beta must stay below {1 / lambda_max:.4f}")

implicit_grid, phi_grid, worst = {}, {}, 0.0
for num_steps in STEPS:
    for step_size in STEP_SIZES:
        prior = implicit_prior(linear.model, exact_eb, support,
                               hbm.TruncatedGD(num_steps, step_size))
        phi_k = gradient_descent(exact_eb["theta"], exact_eb["sigma"], support["x"],
                                 support["y"], num_steps, step_size)
        phi_map = map_under_prior(prior, exact_eb["sigma"], support["x"], support["y"])
        worst = max(worst, float(jnp.max(jnp.abs(phi_map - phi_k))))
        implicit_grid[num_steps, step_size], phi_grid[num_steps, step_size] = prior, phi_k
print(f"worst gap over {len(STEPS) * len(STEP_SIZES)} settings x {num_tasks} tasks: {worst:.2e}")
assert worst < 1e-8, worst

# %% [markdown]
# ### How K and β shape the implicit prior
#
# Each panel below is one $(K, \beta)$ for one task (the one whose design is most
# anisotropic): the implicit prior's 1- and 2-sd ellipses (orange) around θ (the start, `+`),
# the support likelihood's 1- and 2-sd ellipses (blue) around the least-squares fit
# $\phi^\star$, MAML's adapted $\hat\phi$ (red dot) and the gradient-descent path (grey).
# Reading across a row (larger β) or down a column (more steps), the prior widens, and
# fastest along the well-determined direction of the data (the short axis of the blue
# ellipse), where it soon is effectively flat and $\hat\phi$ reaches $\phi^\star$. Along the
# least-determined direction the variance stays near its floor $K\beta$ while
# $K\beta\lambda_{\min}$ is small (compare "min q" with "Kβ" in the titles). Few small steps =
# a tight prior = strong pooling towards θ; many large steps = a flat prior = no pooling (in
# the bottom-right panel the prior has left the frame). Grant et al.'s Figure 2 makes the
# same point.

# %%
def ellipse(mean, cov, radius):
    """Points on the ellipse {mean + radius * L u : |u| = 1} with cov = L L^T."""
    values, vectors = np.linalg.eigh(np.asarray(cov))
    angle = np.linspace(0.0, 2 * np.pi, 200)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    return np.asarray(mean)[:, None] + radius * vectors @ (np.sqrt(values)[:, None] * circle)


eigenvalues = np.linalg.eigvalsh(np.asarray(hessians))
task = int(np.argmax(eigenvalues[:, 1] / eigenvalues[:, 0]))
x_task, y_task = np.asarray(support["x"][task]), np.asarray(support["y"][task])
theta_hat, sigma_hat = np.asarray(exact_eb["theta"]), float(exact_eb["sigma"])
phi_star = np.linalg.lstsq(x_task, y_task, rcond=None)[0]
likelihood_cov = sigma_hat**2 * np.linalg.inv(x_task.T @ x_task)
center = 0.5 * (theta_hat + phi_star)
half_width = 1.2 * max(np.abs(phi_star - theta_hat).max(), 3 * np.sqrt(likelihood_cov.max()))

figure, axes = plt.subplots(len(STEPS), len(STEP_SIZES), figsize=(10, 10), sharex=True,
                            sharey=True, layout="constrained")
for row, num_steps in enumerate(STEPS):
    for col, step_size in enumerate(STEP_SIZES):
        ax = axes[row, col]
        prior_cov = np.asarray(implicit_grid[num_steps, step_size].covariance_matrix[task])
        path = [theta_hat]
        for k in range(1, num_steps + 1):
            path.append(np.asarray(gradient_descent(exact_eb["theta"], exact_eb["sigma"],
                                                    support["x"][task:task + 1],
                                                    support["y"][task:task + 1], k,
                                                    step_size))[0])
        path = np.array(path)
        for radius, style in ((1, "-"), (2, "--")):
            ax.plot(*ellipse(theta_hat, prior_cov, radius), style, color="tab:orange",
                    label=f"implicit prior, {radius} sd")
            ax.plot(*ellipse(phi_star, likelihood_cov, radius), style, color="tab:blue",
                    label=f"support likelihood, {radius} sd")
        ax.plot(*path.T, ".-", color="0.55", markersize=3, linewidth=0.8, label="GD path")
        ax.plot(*theta_hat, "+", color="tab:orange", markersize=12, markeredgewidth=2,
                label=r"start $\theta$")
        ax.plot(*phi_star, "x", color="tab:blue", markersize=8, label=r"least squares $\phi^\star$")
        ax.plot(*phi_grid[num_steps, step_size][task], "o", color="tab:red", markersize=5,
                label=r"MAML $\hat\phi$ (= MAP)")
        q_min = float(np.linalg.eigvalsh(prior_cov)[0])
        ax.set_title(f"K={num_steps}, β={step_size}:  min q = {q_min:.3f}  (Kβ = "
                     f"{num_steps * step_size:.3f})", fontsize=9)
        ax.set_xlim(center[0] - half_width, center[0] + half_width)
        ax.set_ylim(center[1] - half_width, center[1] + half_width)
        ax.set_aspect("equal")
        if row == len(STEPS) - 1:
            ax.set_xlabel(r"$\phi[0]$ (intercept)")
        if col == 0:
            ax.set_ylabel(r"$\phi[1]$ (slope)")
handles, labels = axes[0, 0].get_legend_handles_labels()
figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize="small")
figure.suptitle(f"Implicit prior of K gradient steps of size β, task {task} "
                f"(globals at the exact EB fit)")
show(figure, "implicit_prior_grid")

# %% [markdown]
# ## 4. Fitting θ: MAML, exact empirical Bayes and NUTS
#
# Now we fit the globals three ways, all on the same 20 points per task:
#
# * **MAML**: `hbm.MetaEB(model, inner=hbm.TruncatedGD(5, 0.002), objective="maml")`
#   maximises $\mathcal L_{\text{MAML}}$ (adapt on the support points, score the query points)
#   over θ and σ with Adam.
# * **Laplace empirical Bayes**: `hbm.MetaEB(model, inner=hbm.Newton(),
#   objective="laplace")` maximises the (here exact) evidence of all 20 points of each task:
#   type-II maximum likelihood.
# * **NUTS** on the full model (θ, τ, σ and every $\phi_j$), from
#   `numpyro_hbmeta.baselines.run_nuts`: full Bayes, the reference.
#
# `MetaEB.run` returns a `MetaEBResult`: `.params` (the globals, constrained), `.losses` and
# `.inactive_sites`, the globals the objective does not depend on. For comparison tables and
# plots every method is turned into one `hbm.FitResult` (draws with leading chain and draw
# axes; a point estimate is repeated and listed in `point_sites`); for `MetaEB` the task
# draws come from `MetaEB.sample_posterior`, the Laplace Gaussian of each task at the fitted
# globals (under MAML's implicit prior for MAML).

# %%
MAML_STEPS, EB_STEPS = 1000, 1500


def eb_fit_result(name, driver, fit, data_, wall_time, rng_key, num_samples=1000):
    """A FitResult of a MetaEB fit: the fitted globals repeated, task draws from the task
    posterior; globals the objective ignores (fit.inactive_sites) carry no information and
    are left out."""
    draws = driver.sample_posterior(rng_key, fit.params, data_, num_samples)
    samples = {k: np.asarray(v)[None] for k, v in draws.items() if k not in fit.inactive_sites}
    return hbm.FitResult(name, driver.model, dict(data_), samples,
                         point_sites=tuple(k for k in fit.params if k in samples),
                         wall_time=wall_time,
                         approximate="point estimate of the globals (empirical Bayes)")


t0 = time.perf_counter()
maml = hbm.MetaEB(linear.model, inner=maml_inner, objective="maml",
                  optimizer=optax.adam(0.02))
maml_fit = maml.run(jax.random.PRNGKey(1), MAML_STEPS, support, query, progress_bar=False)
maml_result = eb_fit_result("maml", maml, maml_fit, support, time.perf_counter() - t0,
                            jax.random.PRNGKey(11))
print(f"MAML ({maml_result.wall_time:.1f} s): not in the objective: {maml_fit.inactive_sites};",
      {k: np.round(np.asarray(v), 4).tolist() for k, v in maml_fit.params.items()
       if k not in maml_fit.inactive_sites})

t0 = time.perf_counter()
laplace = hbm.MetaEB(linear.model, inner=hbm.Newton(), objective="laplace",
                     optimizer=optax.adam(0.05))
laplace_fit = laplace.run(jax.random.PRNGKey(2), EB_STEPS, all_data, progress_bar=False)
laplace_result = eb_fit_result("laplace", laplace, laplace_fit, all_data,
                               time.perf_counter() - t0, jax.random.PRNGKey(12))
print(f"Laplace EB ({laplace_result.wall_time:.1f} s):",
      {k: np.round(np.asarray(v), 4).tolist() for k, v in laplace_fit.params.items()})

nuts_result = baselines.run_nuts(linear.model, all_data, jax.random.PRNGKey(3),
                                 num_warmup=NUTS_WARMUP, num_samples=NUTS_SAMPLES,
                                 num_chains=1, progress_bar=False)
print(f"NUTS ({nuts_result.wall_time:.1f} s): {nuts_result.info['divergences']} divergences")

# %% [markdown]
# **Laplace EB is exact type-II ML.** With Newton's inner solver the Laplace evidence is the
# exact evidence, so `MetaEB(objective="laplace")` must land on the same maximiser as the
# SciPy reference. Adam (learning rate 0.05, 1500 steps) converges to ~1e-9 here; we assert
# 1e-4, a bound on the optimiser's convergence, small against the statistical uncertainty of
# the estimates (posterior sds ~0.1–0.2).

# %%
for name in exact_eb:
    error = float(jnp.max(jnp.abs(laplace_fit.params[name] - exact_eb[name])))
    print(f"{name:6s} |Laplace EB - exact type-II ML| = {error:.1e}")
    assert error < 1e-4, (name, error)

# %% [markdown]
# The table below puts the three side by side with the simulation's truth. Three things to
# read in it:
#
# * **τ is not in MAML's objective** (`inactive_sites == ("tau",)`): the inner loop never
#   touches $p(\phi_j \mid \theta, \tau)$, the implicit prior replaces it. What plays the role
#   of $\tau^2$ is the implicit prior's variance, fixed by $K$, $\beta$ and the data. Below we
#   print it at MAML's fitted globals.
# * **MAML's σ̂ is larger than the noise.** MAML scores the query points with the plug-in
#   $p(y^{\text{query}} \mid \hat\phi_j, \sigma)$, which ignores the uncertainty of $\hat\phi_j$;
#   a larger σ absorbs it. (σ also sets the inner loop's effective step $\beta/\sigma^2$, so in
#   MAML it does double duty.)
# * **MAML pools far too much here.** With the zoo's $K = 5$, $\beta = 0.002$ the implicit
#   prior has sd $\approx \sqrt{K\beta} = 0.1$ in every direction, against EB's
#   $\hat\tau \approx 0.5$ (printed below): MAML's $\hat\phi_j$ stay close to θ, and the query
#   residuals this leaves are another reason for the large σ̂.
# * Even so, θ̂ from MAML and from EB are close, and both sit well inside NUTS's posterior of
#   θ: θ is the centre of the task effects, and both estimators find it.

# %%
def global_draws(result):
    """Flat draws of the scalar globals of a FitResult (absent sites left out)."""
    draws = {k: np.asarray(v).reshape(-1, *np.shape(v)[2:]) for k, v in result.samples.items()}
    rows = {f"theta[{i}]": draws["theta"][:, i] for i in range(2)}
    return rows | {k: draws[k] for k in ("tau", "sigma") if k in draws}


table = pd.DataFrame({"truth": [*np.asarray(data.truth["theta"]), float(data.truth["tau"]),
                                float(data.truth["sigma"])],
                      "exact EB": [*np.asarray(exact_eb["theta"]), float(exact_eb["tau"]),
                                   float(exact_eb["sigma"])]},
                     index=["theta[0]", "theta[1]", "tau", "sigma"])
for result in (maml_result, laplace_result):
    table[result.method] = pd.Series({k: v[0] for k, v in global_draws(result).items()})
table["nuts mean"] = pd.Series({k: v.mean() for k, v in global_draws(nuts_result).items()})
table["nuts sd"] = pd.Series({k: v.std() for k, v in global_draws(nuts_result).items()})
print(table.round(3).to_string())  # NaN: tau is not estimated by MAML

prior_at_maml = implicit_prior(linear.model, maml_fit.params, support, maml_inner)
prior_sd = np.sqrt(np.linalg.eigvalsh(np.asarray(prior_at_maml.covariance_matrix)))
print(f"\nMAML's implicit prior at its own globals: sd along the eigen-directions of each task "
      f"range over [{prior_sd.min():.3f}, {prior_sd.max():.3f}]  (sqrt(K beta) = "
      f"{np.sqrt(K * BETA):.3f});  exact EB tau_hat = {float(exact_eb['tau']):.3f}")

# %% [markdown]
# **EB against full Bayes.** With a vague prior on θ, the posterior of θ given (τ, σ) is
# Gaussian around the generalised least-squares estimate, and averaging over the posterior of
# (τ, σ) moves its mean only by a fraction of its sd; the type-II ML θ̂ should therefore sit
# near NUTS's posterior mean. We require $|\bar\theta_{\text{NUTS}} - \hat\theta_{\text{EB}}|$
# to be below $0.25\,\mathrm{sd} + 4\,\mathrm{MCSE}$, where sd is NUTS's posterior sd and MCSE
# $= \mathrm{sd}/\sqrt{\mathrm{ESS}}$ the Monte Carlo standard error of NUTS's mean (ESS from
# ArviZ): the first term allows the genuine mean–mode gap, the second the sampling noise
# (four MCSEs: a false alarm has probability below 1e-4). MAML's θ̂ is a different estimator
# (another objective, another prior), so for it we only check that it lies within 2 posterior
# sds of NUTS's mean: "MAML estimates the same θ", not "MAML equals EB".

# %%
theta_draws = np.asarray(nuts_result.samples["theta"])  # (chain, draw, 2)
ess = az.ess(az.convert_to_dataset({"theta": theta_draws}))["theta"].values
nuts_mean, nuts_sd = theta_draws.mean((0, 1)), theta_draws.std((0, 1))
mcse = nuts_sd / np.sqrt(ess)
for name, estimate in (("laplace EB", laplace_fit.params["theta"]),
                       ("maml", maml_fit.params["theta"])):
    gap = np.abs(np.asarray(estimate) - nuts_mean)
    print(f"{name:10s} |theta_hat - NUTS mean| / NUTS sd = {np.round(gap / nuts_sd, 3)}"
          f"   (MCSE / sd = {np.round(mcse / nuts_sd, 3)}, ESS = {np.round(ess).astype(int)})")
gap_eb = np.abs(np.asarray(laplace_fit.params["theta"]) - nuts_mean)
assert np.all(gap_eb < 0.25 * nuts_sd + 4 * mcse), (gap_eb, nuts_sd, mcse)
gap_maml = np.abs(np.asarray(maml_fit.params["theta"]) - nuts_mean)
assert np.all(gap_maml < 2 * nuts_sd), (gap_maml, nuts_sd)

# %% [markdown]
# ### The globals and the task effects, method by method
#
# Left: NUTS's draws of θ (the posterior, with 50% and 90% contours of its Gaussian fit), the
# two point estimates, the truth and the average of the simulated task effects $\phi_j$. θ
# is the mean of the *population* of tasks; the data only see the $J$ tasks drawn from it, so
# every method estimates something close to their average $\bar\phi$, which with this draw
# of tasks lies about $0.4$ above the truth in the slope. That is the sampling variability of
# $J$ tasks, which NUTS's posterior sd of θ (about $\tau/\sqrt{J}$) accounts for.
#
# Right: `numpyro_hbmeta.plots.forest` of the task slopes $\phi_j[1]$ for the three
# methods: NUTS's 50%/90% intervals (black, on a grey band), Laplace EB's task posterior at
# the fitted globals (exact given them; it differs from NUTS only by plugging in θ̂, τ̂, σ̂) and
# MAML's task posterior, the Gaussian with the implicit prior's precision plus the support
# likelihood's (built from the 10 support points only). MAML's task effects are pulled most of
# the way to θ: its implicit prior is the too-narrow one
# printed above.

# %%
figure, (ax_theta, ax_forest) = plt.subplots(
    1, 2, figsize=(12, max(6.0, 1.0 + 0.35 * num_tasks)), layout="constrained",
    gridspec_kw={"width_ratios": [1, 1.2]})
flat_theta = theta_draws.reshape(-1, 2)
ax_theta.plot(*flat_theta.T, ".", color="0.6", markersize=2, alpha=0.5, label="NUTS draws")
for radius, style in ((1.1774, "-"), (2.1460, "--")):  # 50% and 90% of a 2-D Gaussian
    ax_theta.plot(*ellipse(nuts_mean, np.cov(flat_theta.T), radius), style, color="black",
                  linewidth=1, label=f"NUTS {'50' if radius < 2 else '90'}% (Gaussian fit)")
# colours as in the forest plot: MAML C0, Laplace EB C1, NUTS black
ax_theta.plot(*np.asarray(maml_fit.params["theta"]), "D", color="C0", markersize=7,
              label="MAML")
ax_theta.plot(*np.asarray(exact_eb["theta"]), "s", color="C1", markersize=8,
              label="exact EB / Laplace EB")
ax_theta.plot(*np.asarray(data.truth["theta"]), "*", color="tab:red", markersize=14,
              label=r"truth $\theta$")
ax_theta.plot(*np.asarray(data.truth["phi"]).mean(0), "P", color="tab:red", markersize=10,
              mfc="white", label=r"mean of the simulated $\phi_j$")
ax_theta.set_xlabel(r"$\theta[0]$ (intercept)")
ax_theta.set_ylabel(r"$\theta[1]$ (slope)")
ax_theta.set_title(r"population mean $\theta$")
ax_theta.legend(fontsize="small")
plots.forest({"maml": maml_result, "laplace": laplace_result, "nuts": nuts_result}, "phi",
             task_labels=data.task_labels, component=1, ax=ax_forest)
ax_forest.set_title(r"task slopes $\phi_j[1]$: mean, 50% and 90% intervals")
ax_forest.use_sticky_edges = False  # the reference band would otherwise clip the x range
ax_forest.autoscale_view()
show(figure, "theta_and_forest")

# %% [markdown]
# `hbm.compare` summarises each method's draws against NUTS's, site by site (task sites
# averaged over tasks): `mean_diff_sd` is $|m - m_{\text{NUTS}}| / s_{\text{NUTS}}$, `sd_ratio`
# the ratio of sds (undefined for point estimates), `coverage_90` the fraction of NUTS draws
# inside the method's central 90% interval. The global rows make the point-estimate nature of
# both EB methods plain (coverage 0); the `phi` rows show how close the plug-in task posteriors
# are to full Bayes.

# %%
comparison = hbm.compare({"maml": maml_result, "laplace": laplace_result,
                          "nuts": nuts_result}, reference="nuts")
columns = ["method", "site", "mean_diff_sd", "sd_ratio", "coverage_90", "wall_time"]
print(comparison[columns].round(3).to_string(index=False))
phi_rows = comparison[comparison["site"] == "phi"].set_index("method")
assert phi_rows.loc["laplace", "mean_diff_sd"] < 0.3, phi_rows

# %% [markdown]
# The last assert: the Laplace-EB task posterior (exact given the globals, evaluated at θ̂)
# must put each task's mean within 0.3 NUTS sds of full Bayes on average over tasks, since
# the only difference is plugging in θ̂, τ̂, σ̂ instead of averaging over their posterior.
#
# ## What we learned
#
# * In a hierarchical model, MAML's inner loop ($K$ gradient steps from θ on the support
#   loss) is a point estimate of each task's posterior, and its meta-objective (query
#   log-likelihood at that point) is the empirical-Bayes objective with the posterior
#   predictive replaced by a plug-in: **MAML is empirical Bayes with a crude marginal**.
# * Early stopping is a prior. $K$ steps of size $\beta$ from θ equal, exactly for a
#   quadratic loss, the MAP under $\mathcal N(\theta, O\,\mathrm{diag}(q)\,O^\top)$ with
#   $q_i = ((1-\beta\lambda_i)^{-K} - 1)/\lambda_i$ (`hbm.implicit_prior`); we checked it to
#   1e-8 over a grid of $K$ and $\beta$. $K\beta$ acts as $\tau^2$, and the prior flattens
#   along directions the data determine well.
# * With Newton's inner solver and the Laplace evidence, `MetaEB` is exact type-II maximum
#   likelihood here (checked against SciPy to 1e-4), and the EB θ̂ sits within a fraction of
#   a posterior sd of NUTS's posterior mean.
#
# ## Where the approximation fails
#
# * **The prior is not learned.** τ does not enter MAML's objective; the strength of pooling
#   is set by $K$ and $\beta$ (and σ, through the curvature), chosen by hand. EB learns τ̂
#   from the data.
# * **Point estimates at both levels.** MAML's plug-in predictive ignores the uncertainty of
#   $\hat\phi_j$ (its σ̂ inflates to compensate), and every EB method ignores the uncertainty
#   of θ: with few tasks NUTS's posterior of θ is wide and EB's coverage of it is 0.
# * **Only for quadratic losses is the implicit prior exact.** For a neural network the
#   statement is local (the Hessian at θ), and where $\beta\lambda \ge 1$ gradient descent
#   does not contract, so no Gaussian prior reproduces it (`hbm.implicit_prior` raises).
# * **The implicit prior depends on the task's design**, so two tasks with the same true
#   $\phi_j$ but different inputs are shrunk differently; a real hierarchical prior would not
#   do that.

# %%
print(f"tutorial 01 finished in {time.perf_counter() - START:.1f} s "
      f"({'small' if SMALL else 'full'} mode)")

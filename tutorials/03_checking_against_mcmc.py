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
# # Checking the fast approximations against MCMC
#
# The point of writing a meta-learning model as an ordinary NumPyro model is that the same
# function can be fitted by the fast approximations (empirical Bayes with a Laplace marginal,
# MAML, LLAMA) *and* by NUTS, so every fast answer can be checked against full Bayes. This
# tutorial does that on two real data sets where the task level is linear-Gaussian, so that the
# Laplace marginal is exact and every difference we see is the *method's* doing:
#
# * **Minnesota radon** (Gelman & Hill 2006): 919 houses in 85 counties, a varying intercept per
#   county. Ragged tasks (1 to 116 houses), handled with a mask. Here every method should agree,
#   and we check that they do.
# * **Eight schools** (Rubin 1981; BDA3 §5.5): eight estimated effects with known standard
#   errors. Here empirical Bayes fails in a classic way, τ̂ = 0, and we see the library detect
#   it and two remedies fix it.
#
# The methods, all from the library's public API and all run on the user's model unchanged:
#
# * **NUTS**, `baselines.run_nuts(model, data, key)`: full Bayes over the globals and every
#   task parameter, the reference.
# * **NUTS on the marginal**, `baselines.run_nuts_marginal(model, data, key)`: NUTS over the
#   globals of `hbm.meta_marginal(model, inner=hbm.Newton(), objective="laplace")`, the model
#   with every task integrated out by Laplace's method (INLA-style); task draws come from each
#   draw's Laplace Gaussian.
# * **Laplace EB**, `baselines.run_eb(model, data, key, objective="laplace",
#   inner=hbm.Newton())` or `hbm.MetaEB(...)`: type-II maximum likelihood of the globals and
#   the Laplace task posterior at them.
# * **SVI**, `baselines.run_svi(model, data, key, guide="normal")`: variational inference with
#   a mean-field Gaussian guide (`AutoNormal`).
#
# Each returns a `FitResult`; `hbm.compare` and `numpyro_hbmeta.plots` take any of them.
#
# *Small mode* (the test suite's) runs only what the checks below need: NUTS and NUTS on the
# marginal for radon, and the two empirical-Bayes fits for eight schools. Laplace EB and SVI on
# radon, and NUTS on eight schools, appear in the full run.

# %%
import os
import time
import warnings
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
import scipy.optimize
import scipy.stats

import numpyro_hbmeta as hbm
from numpyro_hbmeta import baselines, plots
from numpyro_hbmeta.data import take_tasks
from numpyro_hbmeta.models import eight_schools, radon
from numpyro_hbmeta.output.compare import summary_table

# float64: Newton's convergence test (tol 1e-8) can only trigger above float32's precision.
numpyro.enable_x64()

SMALL = os.environ.get("HBMETA_TUTORIAL_SMALL") == "1"
OUT = Path(os.environ.get("HBMETA_TUTORIAL_OUT", "tutorial_outputs")) / (
    "03_checking_against_mcmc")
OUT.mkdir(parents=True, exist_ok=True)
START = time.perf_counter()

# Small mode: the 12 largest radon counties, one short NUTS chain, and only the fits the
# checks need. (Each NUTS-on-the-marginal run costs ~40 s of compilation on 2 CPU cores,
# whatever the number of draws, so small mode runs it once.)
NUTS = dict(num_warmup=300, num_samples=300, num_chains=1) if SMALL else dict(
    num_warmup=500, num_samples=1000, num_chains=2)
EXTRAS = not SMALL


def show(figure, name):
    """Save a pyplot figure under OUT and display it."""
    figure.savefig(OUT / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.show()


def ess(result, site):
    """ArviZ bulk effective sample size of each scalar of a site: shape (values,)."""
    draws = np.asarray(result.samples[site], float)
    draws = draws.reshape(*draws.shape[:2], -1)
    return az.ess(az.convert_to_dataset({site: draws}))[site].values.reshape(-1)


def flat(result, site):
    """(draws, values) of a site, chains stacked."""
    draws = np.asarray(result.samples[site], float)
    return draws.reshape(draws.shape[0] * draws.shape[1], -1)


# %% [markdown]
# ## Part 1: radon, where everything should agree
#
# Log radon $y_i$ of house $i$ in county $j[i]$, measured in the basement ($x_i = 0$) or on the
# first floor ($x_i = 1$) (Gelman & Hill 2006, §12.3–12.4, `lmer(y ~ x + (1 | county))`):
#
# $$\alpha_j \sim \mathcal N(\mu_\alpha, \tau^2), \qquad
#   y_i \sim \mathcal N(\alpha_{j[i]} + \beta x_i, \sigma^2),$$
#
# with $\mu_\alpha, \beta \sim \mathcal N(0, 10^2)$ and $\tau, \sigma \sim$ HalfNormal(1).
# A task is a county; `radon.load_data` pads every county to the largest and passes a `mask`,
# so padded houses contribute exactly zero. With `query=False` every house is data (no
# held-out set: we are doing statistics here, not few-shot prediction).

# %%
radon_data = radon.load_data(small=SMALL, query=False)
data = radon_data.support
houses = np.asarray(data["mask"].sum(-1))
print(f"{len(radon_data.task_labels)} counties, {int(houses.sum())} houses; houses per county "
      f"from {houses.min()} to {houses.max()}; padded arrays {tuple(data['floor'].shape)}")

# %% [markdown]
# The four fits. NUTS on the full model samples 4 globals and one intercept per county; NUTS
# on the marginal samples only the 4 globals, each density evaluation solving every county's
# posterior mode by Newton's method (one step here: the county posterior is Gaussian) and
# adding its exact Laplace evidence.

# %%
fits = {}
fits["nuts"] = baselines.run_nuts(radon.model, data, jax.random.PRNGKey(1), **NUTS,
                                  progress_bar=False)
fits["nuts_marginal"] = baselines.run_nuts_marginal(radon.model, data, jax.random.PRNGKey(2),
                                                    **NUTS, progress_bar=False)
if EXTRAS:
    fits["laplace"] = baselines.run_eb(radon.model, data, jax.random.PRNGKey(3),
                                       objective="laplace", inner=hbm.Newton(),
                                       num_steps=1500, optimizer=optax.adam(0.05),
                                       progress_bar=False)
    fits["svi_normal"] = baselines.run_svi(radon.model, data, jax.random.PRNGKey(4),
                                           num_steps=5000, learning_rate=0.02,
                                           progress_bar=False)
for name, fit in fits.items():
    extra = (f", {fit.info['divergences']} divergences" if "divergences" in fit.info else "")
    print(f"{name:14s} {fit.wall_time:6.1f} s{extra}")

# %% [markdown]
# **Laplace EB is exact type-II maximum likelihood here** (full mode). The zoo's
# `radon.exact_type2_ml` maximises the closed-form county evidence with SciPy (independently of
# the library's handler). Adam with 1500 steps reaches it to ~1e-10; we assert 1e-3, a bound on
# the optimiser's convergence that is still 20 times below the smallest posterior sd of a global
# (σ's, ≈ 0.02). On all 85 counties this is the maximum-likelihood `lmer` fit that Gelman & Hill
# report, (μ_α, β, τ, σ) = (1.46, −0.69, 0.33, 0.76), which we check to their two decimals.

# %%
exact = radon.exact_type2_ml(data)
rows = []
for name in radon.GLOBALS:
    row = {"site": name, "exact EB": float(exact[name])}
    for method, fit in fits.items():
        draws = flat(fit, name)[:, 0]
        row[method] = (f"{draws[0]:.4f}" if name in fit.point_sites
                       else f"{draws.mean():.3f} ± {draws.std():.3f}")
    rows.append(row)
print("point estimates, or posterior mean ± sd:")
print(pd.DataFrame(rows).set_index("site").round(4).to_string())
if "laplace" in fits:
    errors = {name: abs(float(fits["laplace"].samples[name][0, 0]) - float(exact[name]))
              for name in radon.GLOBALS}
    print("|Laplace EB - exact type-II ML|:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-3, errors
if not SMALL:  # the published lmer fit (two decimals) is for all 85 counties
    np.testing.assert_allclose([float(exact[k]) for k in radon.GLOBALS],
                               [1.46, -0.69, 0.33, 0.76], atol=0.01)

# %% [markdown]
# ### NUTS on the marginal agrees with NUTS on the full model
#
# For linear-Gaussian tasks the Laplace marginal is the exact marginal, so both samplers target
# the *same* posterior of the globals, and any difference between them is Monte Carlo error.
# That sets the tolerances:
#
# * **Means.** ArviZ's Monte Carlo standard error of each posterior mean (`az.mcse`, from the
#   effective sample size) gives the standard error of the difference of two independent
#   estimates, $\sqrt{\mathrm{MCSE}_1^2 + \mathrm{MCSE}_2^2}$; each global's means must agree
#   within **4** of them (a false alarm has probability ~1e-4 per global).
# * **County intercepts.** Under pure Monte Carlo error $|\Delta\text{mean}|/\text{s.e.}$ is
#   half-normal with mean $\sqrt{2/\pi} \approx 0.8$; averaged over $J$ counties its sd is
#   $0.6/\sqrt J$. We require the average below **1.6** (more than four such sds above 0.8 even
#   for $J = 12$).
# * **Sds.** The sd of a posterior is estimated less precisely than its mean, and NUTS's
#   estimate of its own Monte Carlo error for it is itself rough (in our full run σ's sd came
#   out 0.0196 from NUTS and 0.0173 from NUTS on the marginal, with MCSEs of 0.0005, while two
#   runs of 4000 draws each, of NUTS on the full model and on the closed-form marginal, give
#   0.018–0.0185). So we only require the sds to agree within **20%**: a check that the
#   marginal has the right *shape*, far above Monte Carlo noise (a few %) and far below what a
#   wrong marginal produces (without its log-determinant term, for instance, the Laplace
#   objective grows without bound as τ → 0).

# %%
def mcse(result, site, method="mean"):
    """ArviZ's Monte Carlo standard error of each scalar of a site: shape (values,)."""
    draws = np.asarray(result.samples[site], float)
    draws = draws.reshape(*draws.shape[:2], -1)
    return az.mcse(az.convert_to_dataset({site: draws}), method=method)[site].values


full, marginal = fits["nuts"], fits["nuts_marginal"]
rows = []
for name in [*radon.GLOBALS, "alpha"]:
    a, b = flat(full, name), flat(marginal, name)
    gap = np.abs(a.mean(0) - b.mean(0))
    se = np.sqrt(mcse(full, name) ** 2 + mcse(marginal, name) ** 2)
    sd_ratio = b.std(0) / a.std(0)
    rows.append({"site": name, "|Δmean| / s.e.": (gap / se).mean(),
                 "|Δmean| / sd": (gap / a.std(0)).mean(), "sd ratio": sd_ratio.mean(),
                 "ESS nuts": ess(full, name).mean(), "ESS marginal": ess(marginal, name).mean()})
    if name == "alpha":
        assert (gap / se).mean() < 1.6, (gap / se).mean()
    else:
        assert np.all(gap < 4 * se), (name, a.mean(), b.mean(), se)
    assert np.all(np.abs(sd_ratio - 1) < 0.2), (name, sd_ratio)
print("(alpha: averaged over counties)")
print(pd.DataFrame(rows).set_index("site").round(3).to_string())

# %% [markdown]
# ### Every method against NUTS
#
# `hbm.compare(fits, reference="nuts")` measures each method's posterior against NUTS's, site
# by site (the county intercepts averaged over counties): `mean_diff_sd` is the error of the
# mean in NUTS sds, `sd_ratio` the ratio of sds (NaN for a point estimate), `coverage_90` the
# fraction of NUTS draws inside the method's central 90% interval (≈ 0.9 when calibrated; 0
# for a point estimate). `summary_table` pivots it to one row per method. What to read:
#
# * NUTS on the marginal matches NUTS everywhere, at equal accuracy, from a 4-dimensional
#   sampler instead of one with a dimension per county.
# * (Full mode.) Laplace EB's county intercepts are close to NUTS's (their posterior given the
#   globals is exact; only the plug-in of the globals differs), and its τ̂ is the *mode* of
#   the evidence, below NUTS's posterior mean of τ, whose posterior is skewed to the right.
# * (Full mode.) SVI with a mean-field Gaussian guide gets the means roughly right but its sds
#   of the globals too small: the factorised guide cannot represent the posterior correlation
#   between τ and the county intercepts.

# %%
comparison = hbm.compare(fits, reference="nuts")
print(summary_table(comparison).drop(columns=[("method", "heldout_lpd")]).to_string())

# %% [markdown]
# ### Forest plot and shrinkage
#
# `plots.forest` shows each county's intercept under every method (50% and 90% intervals, NUTS
# in black on a grey band). In full mode there are 85 counties; we show the 6 with fewest and
# the 6 with most houses, by slicing each fit's county axis (and its data) with
# `numpyro_hbmeta.data.take_tasks`.

# %%
order = np.argsort(houses, kind="stable")
shown = np.concatenate([order[:6], order[-6:]]) if not SMALL else order  # by houses


def county_subset(fit, counties):
    """The fit restricted to some counties (task axis of the task site and of the data)."""
    samples = dict(fit.samples)
    samples["alpha"] = np.asarray(samples["alpha"])[:, :, counties]
    return fit._replace(samples=samples, data=take_tasks(fit.data, jnp.asarray(counties)))


labels = [f"{radon_data.task_labels[j]} (n={houses[j]})" for j in shown]
figure, ax = plt.subplots(figsize=(8, 1.0 + 0.5 * len(shown)), layout="constrained")
plots.forest({name: county_subset(fit, shown) for name, fit in fits.items()}, "alpha",
             task_labels=labels, ax=ax)
ax.set_xlabel(r"county intercept $\alpha_j$ (log radon, basement)")
ax.set_title("Radon: county intercepts by method (mean, 50% and 90% intervals)")
ax.use_sticky_edges = False  # the reference band would otherwise clip the x range
ax.autoscale_view()
show(figure, "radon_forest")

# %% [markdown]
# Partial pooling is easiest to see against the number of houses. For each county we plot the
# *no-pooling* estimate (least squares with one intercept per county and a common floor effect,
# `lm(y ~ x + county - 1)`) and NUTS's posterior mean, joined by an arrow, against $n_j$ on a log
# scale; the dashed line is the *complete-pooling* intercept (`lm(y ~ x)`). Counties with few
# houses are pulled most of the way to the population mean, large counties hardly at all: the
# posterior mean is a precision-weighted average of the county's own mean (precision
# $n_j/\sigma^2$) and $\mu_\alpha$ (precision $1/\tau^2$). In small mode only the 12 largest
# counties are fitted, so the pooling is mild.

# %%
mask = np.asarray(data["mask"])
county_of = np.nonzero(mask)[0]
x_house, y_house = np.asarray(data["floor"])[mask], np.asarray(data["log_radon"])[mask]
design = np.column_stack([np.eye(len(houses))[county_of], x_house])
no_pooling = np.linalg.lstsq(design, y_house, rcond=None)[0][:-1]
complete_pooling = np.linalg.lstsq(np.column_stack([np.ones_like(x_house), x_house]), y_house,
                                   rcond=None)[0][0]
partial = flat(fits["nuts"], "alpha").mean(0)

figure, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
jitter = np.exp(np.random.default_rng(0).uniform(-0.08, 0.08, len(houses)))  # separate ties
n_plot = houses * jitter
for n, start, end in zip(n_plot, no_pooling, partial, strict=True):
    ax.annotate("", xy=(n, end), xytext=(n, start),
                arrowprops={"arrowstyle": "-|>", "color": "0.5", "linewidth": 0.8,
                            "shrinkA": 0, "shrinkB": 0, "mutation_scale": 7})
ax.plot(n_plot, no_pooling, "o", mfc="white", color="C1", markersize=5,
        label="no pooling (county's own least squares)")
ax.plot(n_plot, partial, "o", color="C0", markersize=4, label="partial pooling (NUTS mean)")
ax.axhline(complete_pooling, color="0.2", linestyle="--", linewidth=1,
           label="complete pooling")
ax.set_xscale("log")
ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if houses.min() / 1.3 <= t <= houses.max() * 1.3]
ax.set_xticks(ticks, [str(t) for t in ticks])
ax.set_xticks([], minor=True)
ax.set_xlabel("houses in the county, $n_j$ (log scale)")
ax.set_ylabel(r"county intercept $\alpha_j$")
ax.set_title("Radon: shrinkage of county intercepts towards the population mean")
ax.legend(fontsize="small")
show(figure, "radon_shrinkage")

# %% [markdown]
# ## Part 2: eight schools, where empirical Bayes fails
#
# School $j$ reports an estimated coaching effect $y_j$ with known standard error $\sigma_j$:
#
# $$\mu \sim \mathcal N(0, 5^2), \quad \tau \sim \text{HalfCauchy}(5), \quad
#   \theta_j \sim \mathcal N(\mu, \tau^2), \quad y_j \sim \mathcal N(\theta_j, \sigma_j^2).$$
#
# Each school's evidence is closed-form, $y_j \mid \mu, \tau \sim \mathcal N(\mu, \sigma_j^2 +
# \tau^2)$, and so the Laplace marginal is again exact. The data:

# %%
schools = eight_schools.load_data()
school_data = schools.support
print(pd.DataFrame({"y": np.asarray(school_data["y"]), "sigma": np.asarray(school_data["sigma"])},
                   index=schools.task_labels).T.to_string())

# %% [markdown]
# ### Type-II maximum likelihood puts τ̂ on the boundary
#
# Maximising $\sum_j \log \mathcal N(y_j \mid \mu, \sigma_j^2 + \tau^2)$: for each τ the best μ
# is the precision-weighted mean of the $y_j$, and the resulting *profile* evidence decreases
# monotonically in τ on these data (the spread of the $y_j$ is smaller than their standard
# errors alone would produce). Its maximum is at $\hat\tau = 0$: empirical Bayes says the
# schools do not differ at all and pools them completely. The optimiser of `MetaEB` works in
# $\log\tau$, creeps towards $-\infty$ with vanishing gradients and stops at a "small" τ̂;
# `MetaEBResult.boundary_sites` tells the two apart by checking that the objective does not
# get worse when τ̂ is shrunk a thousandfold, and `run` warns with the remedies. We fit with
# `MetaEB` directly (not `run_eb`) because the second remedy below needs its `hyperprior`
# option; a small helper turns a fit into a `FitResult` for the comparisons.

# %%
def eb_fit_result(name, driver, fit, data_, wall_time, rng_key, num_samples=1000):
    """A FitResult of a MetaEB fit: globals repeated, task draws from the task posterior."""
    draws = driver.sample_posterior(rng_key, fit.params, data_, num_samples)
    return hbm.FitResult(name, driver.model, dict(data_),
                         {k: np.asarray(v)[None] for k, v in draws.items()},
                         point_sites=tuple(fit.params), wall_time=wall_time,
                         approximate="point estimate of the globals (empirical Bayes)")


school_fits = {}
t0 = time.perf_counter()
eb_driver = hbm.MetaEB(eight_schools.model, inner=hbm.Newton(), objective="laplace",
                       optimizer=optax.adam(0.05))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    eb_fit = eb_driver.run(jax.random.PRNGKey(0), 1000, school_data, progress_bar=False)
school_fits["laplace EB"] = eb_fit_result("laplace EB", eb_driver, eb_fit, school_data,
                                          time.perf_counter() - t0, jax.random.PRNGKey(10))
for warning in caught:
    print(f"{warning.category.__name__}: {warning.message}")
exact_school = eight_schools.exact_type2_ml(school_data)
print(f"MetaEB: mu_hat = {float(eb_fit.params['mu']):.4f}, "
      f"tau_hat = {float(eb_fit.params['tau']):.4f}, boundary_sites = {eb_fit.boundary_sites}")
print(f"exact type-II ML: mu_hat = {float(exact_school['mu']):.4f}, "
      f"tau_hat = {float(exact_school['tau']):.4f}")

# %% [markdown]
# The checks: the boundary is reported (`boundary_sites == ("tau",)`, with a warning), τ̂ is
# small, and μ̂ is the closed-form maximiser, the precision-weighted mean 7.6856, to 0.01 (at
# τ̂ ≈ 0.05 instead of 0 the weights $1/(\sigma_j^2 + \tau^2)$ change by ~1e-5 relative).

# %%
assert eb_fit.boundary_sites == ("tau",)
assert any("boundary" in str(w.message) for w in caught)
assert float(eb_fit.params["tau"]) < 0.5
assert abs(float(eb_fit.params["mu"]) - float(exact_school["mu"])) < 0.01

# %% [markdown]
# ### Remedy 1: a hyperprior that vanishes at the boundary (MAP-II)
#
# `MetaEB(..., hyperprior=True)` maximises $\log p(\mu, \tau) + \sum_j \log p(y_j \mid \mu,
# \tau)$ instead (MAP-II), with the model's own priors, evaluated on τ itself (no Jacobian).
# The model's HalfCauchy(5) density is *largest* at τ = 0, so it cannot help: the penalised
# profile is still decreasing (left panel of the figure below). A prior whose density vanishes
# at 0 can: Chung et al. (2013, *Psychometrika*) propose a Gamma(2, λ) prior on the scale, whose
# log density $\log\tau - \lambda\tau$ goes to $-\infty$ at 0 and is nearly flat elsewhere for
# small λ. We swap it in (rate λ = 0.1, prior mean 20) in a copy of the model — the model is
# five lines — and fit MAP-II.

# %%
def eight_schools_gamma(sigma, y=None):
    """Eight schools with a boundary-avoiding Gamma(2, 0.1) prior on tau (Chung et al. 2013)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.Gamma(2.0, 0.1))
    with hbm.tasks(sigma.shape[0], dim=-1):
        theta_school = numpyro.sample("theta_school", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta_school, sigma), obs=y)


t0 = time.perf_counter()
map2_driver = hbm.MetaEB(eight_schools_gamma, inner=hbm.Newton(), objective="laplace",
                         optimizer=optax.adam(0.05), hyperprior=True)
map2_fit = map2_driver.run(jax.random.PRNGKey(0), 1000, school_data, progress_bar=False)
school_fits["MAP-II, Gamma(2, 0.1)"] = eb_fit_result(
    "MAP-II", map2_driver, map2_fit, school_data, time.perf_counter() - t0,
    jax.random.PRNGKey(11))
print(f"MAP-II: mu_hat = {float(map2_fit.params['mu']):.4f}, "
      f"tau_hat = {float(map2_fit.params['tau']):.4f}, "
      f"boundary_sites = {map2_fit.boundary_sites}")

# %% [markdown]
# An independent check of the MAP-II estimate: given τ the penalised objective is quadratic in
# μ (Gaussian evidence times the N(0, 5²) prior), so μ can be profiled out in closed form and τ
# found by SciPy's bounded scalar search, in NumPy. The remedy must move τ̂ off the boundary
# (we require τ̂ > 1, twenty times where plain EB stopped) and must agree with the SciPy
# maximiser to 1e-3, a bound on Adam's convergence after 1000 steps (the two agree to the
# four printed decimals).

# %%
y_school, s_school = np.asarray(school_data["y"]), np.asarray(school_data["sigma"])


def map2_profile_mu(tau):
    """argmax over mu of log N(mu | 0, 5^2) + sum_j log N(y_j | mu, sigma_j^2 + tau^2)."""
    tau = np.asarray(tau, float)[..., None]
    weights = 1.0 / (s_school**2 + tau**2)
    return np.sum(weights * y_school, -1) / (np.sum(weights, -1) + 1.0 / 5.0**2)


def map2_objective(tau, log_prior_tau):
    """The MAP-II objective at (profiled mu, tau), vectorised over tau."""
    tau = np.asarray(tau, float)
    mu = map2_profile_mu(tau)
    scale = np.sqrt(s_school**2 + tau[..., None] ** 2)
    return (scipy.stats.norm.logpdf(y_school, mu[..., None], scale).sum(-1)
            + scipy.stats.norm.logpdf(mu, 0.0, 5.0) + log_prior_tau(tau))


gamma_prior = scipy.stats.gamma(2.0, scale=1 / 0.1)  # rate 0.1
reference = scipy.optimize.minimize_scalar(lambda t: -map2_objective(t, gamma_prior.logpdf),
                                           bounds=(1e-6, 100.0),
                                           method="bounded", options={"xatol": 1e-10})
print(f"SciPy MAP-II: tau_hat = {reference.x:.4f}, mu_hat = {map2_profile_mu(reference.x):.4f}")
assert map2_fit.boundary_sites == ()
assert float(map2_fit.params["tau"]) > 1.0
assert abs(float(map2_fit.params["tau"]) - reference.x) < 1e-3
assert abs(float(map2_fit.params["mu"]) - map2_profile_mu(reference.x)) < 1e-3

# %% [markdown]
# ### Remedy 2: full Bayes over (μ, τ)
#
# The other way out is not to optimise τ at all but to integrate over it, with the model's
# own HalfCauchy prior. Because the marginal posterior $p(\mu, \tau \mid y)$ is
# two-dimensional we can compute it *exactly* on a grid (700 × 3000 points over
# μ ∈ [−30, 40], τ ∈ (0, 60]; the mass outside is negligible: doubling the τ range moves
# $E[\tau \mid y]$ by less than 0.01), and its posterior mean of τ must be well away from 0
# (we assert $E[\tau \mid y] > 1$).
#
# In full mode, NUTS on the marginal samples the same two-dimensional posterior from the
# library's `meta_marginal`, and must reproduce the grid: $E[\tau \mid y]$ within 4 Monte Carlo
# standard errors ($s/\sqrt{\mathrm{ESS}}$) of the grid value. NUTS on the full model, by
# contrast, meets Neal's funnel: in the centred parametrisation small τ forces the $\theta_j$
# into a narrow neck the sampler cannot enter with one step size, and it reports divergences
# and undersamples small τ (compare its P(τ < 1) with the grid's in the table below). The usual
# cure is the non-centred parametrisation; the meta-learning handler does not need it, because
# on the marginal there is no funnel.

# %%
if EXTRAS:
    school_fits["nuts_marginal"] = baselines.run_nuts_marginal(
        eight_schools.model, school_data, jax.random.PRNGKey(2), **NUTS, progress_bar=False)
    school_fits["nuts"] = baselines.run_nuts(eight_schools.model, school_data,
                                             jax.random.PRNGKey(1), **NUTS,
                                             progress_bar=False)

mu_grid, tau_grid = np.linspace(-30.0, 40.0, 701), np.linspace(60.0 / 3000, 60.0, 3000)
variance = s_school**2 + tau_grid[None, :, None] ** 2
log_post = (scipy.stats.norm.logpdf(y_school, mu_grid[:, None, None], np.sqrt(variance))
            .sum(-1) + scipy.stats.norm.logpdf(mu_grid, 0.0, 5.0)[:, None]
            + scipy.stats.halfcauchy.logpdf(tau_grid, scale=5.0)[None, :])
weights = np.exp(log_post - log_post.max())
weights /= weights.sum()
tau_density = weights.sum(0) / (tau_grid[1] - tau_grid[0])  # marginal p(tau | y)
tau_mean_exact = float(np.sum(weights.sum(0) * tau_grid))
mu_mean_exact = float(np.sum(weights.sum(1) * mu_grid))

rows = []
for name, fit in school_fits.items():
    tau_draws, mu_draws = flat(fit, "tau")[:, 0], flat(fit, "mu")[:, 0]
    point = "tau" in fit.point_sites
    rows.append({"method": name, "E[mu]": mu_draws.mean(), "E[tau]": tau_draws.mean(),
                 "sd(tau)": np.nan if point else tau_draws.std(),
                 "P(tau < 1)": np.nan if point else (tau_draws < 1).mean(),
                 "divergences": fit.info.get("divergences", np.nan)})
rows.append({"method": "exact (grid)", "E[mu]": mu_mean_exact, "E[tau]": tau_mean_exact,
             "sd(tau)": np.sqrt(np.sum(weights.sum(0) * tau_grid**2) - tau_mean_exact**2),
             "P(tau < 1)": weights.sum(0)[tau_grid < 1].sum(), "divergences": np.nan})
print(pd.DataFrame(rows).set_index("method").round(3).to_string())

assert tau_mean_exact > 1.0  # full Bayes keeps tau off the boundary
if "nuts_marginal" in school_fits:
    marginal_tau = flat(school_fits["nuts_marginal"], "tau")[:, 0]
    mcse = marginal_tau.std() / np.sqrt(ess(school_fits["nuts_marginal"], "tau")[0])
    print(f"NUTS on the marginal: E[tau] = {marginal_tau.mean():.3f} ± {mcse:.3f} (MCSE); "
          f"grid {tau_mean_exact:.3f}")
    assert abs(marginal_tau.mean() - tau_mean_exact) < 4 * mcse

# %% [markdown]
# Left: the profile log evidence $\max_\mu \sum_j \log p(y_j \mid \mu, \tau)$ against τ (its
# maximum is at 0: the EB failure), and the same penalised by the log prior of τ under the two
# priors (each curve shifted so its maximum is 0; the μ prior is included in both): the
# HalfCauchy keeps the maximum at 0, the Gamma(2, 0.1) moves it to τ̂ ≈ 4.7. Right: the
# posterior of τ, exact from the grid and from NUTS on the marginal (and NUTS on the centred
# full model in full mode), with both point estimates. The posterior *density* of τ is highest
# at 0, as the evidence is, but 80% of its mass lies above τ = 1 and it has a long right tail
# (mean 3.6, sd 3.2): averaging over τ instead of maximising gives real, but not complete,
# pooling, and no point estimate, wherever it lands, describes τ well.

# %%
tau_curve = np.linspace(0.0, 25.0, 501)
profile = np.asarray(jax.vmap(lambda t: eight_schools.exact_log_evidence(
    {"mu": eight_schools.profile_mu(t, school_data), "tau": t}, school_data).sum())(
    jnp.asarray(tau_curve)))

figure, (ax_left, ax_right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
ax_left.plot(tau_curve, profile - profile.max(), color="black", label="evidence (type-II ML)")
for label, log_prior, color in (
        ("evidence + log HalfCauchy(5) prior", scipy.stats.halfcauchy(scale=5.0).logpdf, "C3"),
        ("evidence + log Gamma(2, 0.1) prior", gamma_prior.logpdf, "C2")):
    values = map2_objective(tau_curve[1:], log_prior)  # the log prior of tau is -inf or
    ax_left.plot(tau_curve[1:], values - values.max(), color=color, label=label)  # max at 0
ax_left.axvline(float(eb_fit.params["tau"]), color="black", linestyle=":", linewidth=1)
ax_left.axvline(float(map2_fit.params["tau"]), color="C2", linestyle=":", linewidth=1)
ax_left.set_ylim(-3.0, 0.3)
ax_left.set_xlabel(r"$\tau$")
ax_left.set_ylabel("log objective (maximum at 0)")
ax_left.set_title(r"Empirical Bayes and MAP-II objectives, $\mu$ profiled out")
ax_left.legend(fontsize="small", loc="lower left")

ax_right.plot(tau_grid, tau_density, color="black", label="exact posterior (grid)")
bins = np.linspace(0.0, 25.0, 51)
if "nuts_marginal" in school_fits:
    ax_right.hist(marginal_tau, bins=bins, density=True, alpha=0.5, color="C0",
                  label="NUTS on the marginal")
if "nuts" in school_fits:
    ax_right.hist(flat(school_fits["nuts"], "tau")[:, 0], bins=bins, density=True,
                  histtype="step", color="C1", linewidth=1.5,
                  label=f"NUTS, centred full model "
                        f"({school_fits['nuts'].info['divergences']} divergences)")
ax_right.axvline(float(eb_fit.params["tau"]), color="black", linestyle=":",
                 label=rf"EB $\hat\tau$ = {float(eb_fit.params['tau']):.2f}")
ax_right.axvline(float(map2_fit.params["tau"]), color="C2", linestyle=":",
                 label=rf"MAP-II $\hat\tau$ = {float(map2_fit.params['tau']):.2f}")
ax_right.set_xlim(0.0, 25.0)
ax_right.set_xlabel(r"$\tau$")
ax_right.set_ylabel("density")
ax_right.set_title(r"Posterior of $\tau$ (HalfCauchy(5) prior)")
ax_right.legend(fontsize="small")
show(figure, "eight_schools_tau")

# %% [markdown]
# ### What the boundary does to the schools
#
# `plots.shrinkage` draws an arrow per school from its own estimate $y_j$ (no pooling) to the
# method's posterior mean of $\theta_j$, with the complete-pooling estimate (the
# precision-weighted mean) as a dashed line. At τ̂ ≈ 0 empirical Bayes pools every school to
# the same effect; full Bayes pools strongly but keeps the ordering and some spread; MAP-II,
# with τ̂ ≈ 4.7, sits in between. (MAP-II and full Bayes centre the schools near
# μ ≈ 4.4 rather than on the dashed line at 7.7: they include the model's N(0, 5²) prior on
# μ, which type-II maximum likelihood ignores.)

# %%
pooled = float(exact_school["mu"])
panels = [name for name in ("laplace EB", "MAP-II, Gamma(2, 0.1)", "nuts_marginal")
          if name in school_fits]
figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), sharey=True,
                            layout="constrained")
for i, (ax, name) in enumerate(zip(axes, panels, strict=True)):
    plots.shrinkage(school_fits[name], school_data["y"], pooled, site="theta_school",
                    task_labels=schools.task_labels, ax=ax)
    ax.set_title(name)
    ax.set_xlabel("school")
    ax.set_ylabel(r"effect $\theta_j$" if i == 0 else "")
    handles, legend_labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()  # one legend for the figure, below the panels
figure.legend(handles, legend_labels, loc="outside lower center", ncol=3, fontsize="small")
figure.suptitle("Eight schools: no pooling → posterior mean, by method")
show(figure, "eight_schools_shrinkage")

# %% [markdown]
# `hbm.compare` with NUTS on the marginal as the reference (exact marginal, no funnel) rather
# than NUTS on the centred model: the EB row's `theta_school` sd ratio shows how much too
# narrow the task posteriors are at τ̂ ≈ 0, and its coverage how few of the reference draws its
# intervals contain.

# %%
if "nuts_marginal" in school_fits:
    school_comparison = hbm.compare(school_fits, reference="nuts_marginal")
    print(summary_table(school_comparison).drop(columns=[("method", "heldout_lpd")])
          .to_string())

# %% [markdown]
# ## What we learned
#
# * On a model with linear-Gaussian tasks the Laplace marginal is exact, so **NUTS over the
#   globals of `meta_marginal` targets the same posterior as NUTS on the full model**; on radon
#   they agree within Monte Carlo error (checked above with ESS-based tolerances), with a
#   4-dimensional sampler instead of an 89-dimensional one.
# * **Laplace EB is type-II maximum likelihood**, checked against SciPy on the closed-form
#   evidence (and, on all 85 counties, Gelman & Hill's `lmer` fit). Its county effects are close
#   to full Bayes when there are many tasks to pin the globals down.
# * `hbm.compare` and `plots.forest` / `plots.shrinkage` put every method side by side on the
#   same model and the same sites, which is how one finds where an approximation stops being
#   good enough.
#
# ## Where the approximation fails
#
# * **Few tasks, noisy tasks: the boundary.** On eight schools the evidence is maximal at
#   τ = 0 and type-II ML (and so any MAML/LLAMA-style point estimate of the globals) pools
#   everything. `MetaEBResult.boundary_sites` detects it. Remedies: a hyperprior whose density
#   vanishes at 0 (MAP-II with Gamma(2, λ); *not* the model's HalfCauchy, whose mode is at 0),
#   or full Bayes over the globals, here NUTS on the marginal, which also avoids the centred
#   model's funnel.
# * **Point estimates hide the uncertainty of the globals.** Even off the boundary, EB reports
#   one τ̂ where the posterior of τ has sd ≈ 3 and a long tail (eight schools); its task
#   intervals are too narrow wherever the globals are not pinned down.
# * **Mean-field SVI** is fast but underestimates posterior sds of the globals on radon.
# * **Exactness is special.** Both models here have Gaussian tasks. For non-Gaussian tasks
#   (logistic regression, neural networks) the Laplace marginal is an approximation and NUTS on
#   the marginal is INLA-like, not exact; the same checks then measure the approximation.

# %%
print(f"tutorial 03 finished in {time.perf_counter() - START:.1f} s "
      f"({'small' if SMALL else 'full'} mode)")

"""What :class:`~numpyro_hbmeta.MetaEB` says about a fit: at its end, and when a step is refused.

* MAML's Bayesian reading needs β·λ_max < 1 for every task at the fitted globals (Grant et al.,
  ICLR 2018, §3.2: K steps of size β imply the Gaussian prior of eq. 5–6 only then);
* a positive global (a scale) whose objective does not get worse when it is shrunk 1000-fold
  sits at the boundary 0 of its support: empirical Bayes collapses the hierarchy there;
* a refused step is diagnosed by re-running the model with argument validation off, so that
  the report names the non-finite task objectives, the non-positive-definite curvatures and
  the unconverged inner solves, not NumPyro's first invalid-value error.

:class:`FitDiagnostics` is a mixin of :class:`~numpyro_hbmeta.infer.eb.MetaEB`: it reads the
driver's compiled loss, its data placement (``_local``, ``_gathered``) and its model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from numpyro_hbmeta import sites
from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.infer import checks as eb_checks
from numpyro_hbmeta.infer import sharding
from numpyro_hbmeta.inner import TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import data_signature, trace_hidden

__all__ = ["FitDiagnostics"]


class FitDiagnostics:
    """End-of-run checks and the refused-step report of :class:`~numpyro_hbmeta.MetaEB`."""

    def _warn_if_no_implicit_prior(self, params, support, query) -> None:
        """Under MAML's implicit prior, warn when β·λ_max ≥ 1 at the fitted globals for some
        task: K steps of size β then imply no Gaussian prior, and ``task_posterior`` will
        refuse. Checked where it is cheap (d ≤ 64: exact per-task Hessians)."""
        inner = self.inner
        spec = self._structures.get(data_signature(support, query))
        if not (isinstance(inner, TruncatedGD) and inner.prior == "implicit" and inner.num_steps
                and spec is not None and spec.dim <= 64):
            return
        lam = self._lambda_max_jit(dict(params), self._local(support))
        if self._processes:
            lam = self._gathered(lam)
        product = inner.step_size * np.asarray(lam)
        bad = np.nonzero(~(product < 1))[0]
        if bad.size:
            worst = int(bad[np.argmax(product[bad])]) if np.isfinite(product[bad]).any() \
                else int(bad[0])
            warnings.warn(
                f"MetaEB: at the fitted globals β·λ_max ≥ 1 for {bad.size} task(s), e.g. "
                f"{bad[:10].tolist()} (task {worst}: β = {inner.step_size:g}, 1/λ_max = "
                f"{1 / lam[worst]:.3g}): K steps of size β imply no Gaussian prior there, so "
                "MAML's Bayesian reading (the implicit prior, task_posterior) does not hold. "
                f"Use TruncatedGD(step_size < {1 / np.max(lam[bad]):.3g}); with a learned "
                "noise scale σ, MAML shrinks σ and so enlarges the effective step β/σ².",
                stacklevel=4)

    def _boundary_or_warn(self, params, support, query) -> tuple[str, ...]:
        try:
            return self.boundary_sites(params, support, query)
        except FloatingPointError as err:
            warnings.warn(f"MetaEB: {err}", stacklevel=4)
            return ()

    def boundary_sites(self, params: Mapping[str, Any], support, query=None
                       ) -> tuple[str, ...]:
        """Positive globals whose estimate is at the boundary 0 of their support.

        A scale s is at the boundary when loss(s/1000) ≤ loss(s) + 1e-6·(1 + |loss(s)|): the
        objective's supremum is then approached as s → 0, not attained inside the support.

        Raises:
            FloatingPointError: the comparison cannot be made (the loss at the estimate is
                not finite, or it is NaN at the shrunk value); never read as "not at 0".
        """
        globals_ = self._global_sites(jax.random.PRNGKey(0), self._local(support))
        positive = [n for n, site in globals_.items()
                    if site["fn"].support in (constraints.positive, constraints.softplus_positive)
                    and n in params]
        if not positive:
            return ()

        def loss_at(constrained):
            unconstrained = {n: biject_to(globals_[n]["fn"].support).inv(jnp.asarray(v))
                             for n, v in constrained.items()}
            if self._processes:  # the data are global arrays: the globals must be too
                unconstrained = sharding.replicate(unconstrained, self.mesh)
            return float(self._loss_jit(unconstrained, support, query))

        base = loss_at(dict(params))
        if not np.isfinite(base):
            raise FloatingPointError(f"boundary check impossible: the loss at the estimate is "
                                     f"{base} (globals {eb_checks.rounded(params)})")
        out = []
        for name in positive:
            shrunk = loss_at({**params, name: jnp.asarray(params[name]) * 1e-3})
            if np.isnan(shrunk):
                raise FloatingPointError(
                    f"boundary check impossible for {name}: the loss is NaN at {name}/1000 = "
                    f"{np.asarray(params[name]) * 1e-3}, so whether {name} sits at 0 is unknown")
            if shrunk <= base + 1e-6 * (1 + abs(base)):
                out.append(name)
        return tuple(out)

    def _global_sites(self, rng_key, support, substitute_fn=None) -> dict[str, Any]:
        """Trace sites of the global latents of the user's model (tasks hidden, nothing
        solved): their supports, shapes and, with ``substitute_fn``, values."""
        with handlers.block(), handlers.seed(rng_seed=rng_key), handlers.substitute(
                substitute_fn=substitute_fn or (lambda msg: None)):
            context_trace = trace_hidden(self.model, support)
        return {n: s for n, s in context_trace.items()
                if s["type"] == "sample" and not s["is_observed"]
                and n in self._global_names(context_trace)}

    @staticmethod
    def _global_names(trace) -> set[str]:
        return {n for n, s in trace.items() if s["type"] == "sample" and not any(
            is_task_frame(f) for f in s.get("cond_indep_stack", ()))}

    def failure_report(self, step: int, params, support, query, reason: str) -> str:
        """The library's diagnosis of a refused step (argument validation off, so an
        invalid value cannot replace it with NumPyro's own error)."""
        lines = [f"MetaEB: step {step} was refused: {reason}."]
        params, support, query = self._local((params, support, query))
        with numpyro.validation_enabled(False):
            tr = self._trace(params, support, query)
            values = tr[sites.OBJECTIVE]["fn"].log_prob(tr[sites.OBJECTIVE]["value"])
            values = self._gathered(np.asarray(values).reshape(-1))
            bad = np.nonzero(~np.isfinite(values))[0]
            if bad.size:
                lines.append(f"non-finite task objective(s) at task index(es) "
                             f"{bad[:20].tolist()}")
            if sites.CURVATURE_MIN_EIGENVALUE in tr:
                eig = self._gathered(tr[sites.CURVATURE_MIN_EIGENVALUE]["value"])
                not_pd = np.nonzero(~(eig > 0))[0]
                if not_pd.size:
                    lines.append(
                        f"curvature not positive definite for task(s) {not_pd[:20].tolist()} "
                        f"(smallest eigenvalues {eig[not_pd[:5]].round(6).tolist()}); use a "
                        "PSD curvature (ggn, kfac) or a convex task loss")
            converged = self._gathered(tr[sites.INNER_CONVERGED]["value"])
            if not converged.all():
                lines.append(f"inner solver did not converge / diverged for task(s) "
                             f"{np.nonzero(~converged)[0][:20].tolist()}; "
                             + eb_checks.inner_remedy(self.inner))
            constrained = {k: np.asarray(tr[k]["value"]).round(4).tolist() for k in params}
        lines.append(f"globals at that step: {constrained}")
        return "\n".join(lines)

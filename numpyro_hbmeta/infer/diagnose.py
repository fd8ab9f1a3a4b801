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

Full-data passes (the boundary check's losses, the implicit-prior check's λ_max, the report of
a refused step) run over the tasks in chunks of a fixed size (:meth:`FitDiagnostics._chunks`):
one compiled function per chunk size, the last chunk padded with copies of the last task that
count 0, so memory is that of a chunk whatever J is. Data in host memory (NumPy arrays) are
gathered on the host, chunk by chunk, and only the chunk is moved to the device.
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
from numpyro_hbmeta.data import take_tasks
from numpyro_hbmeta.handlers import is_task_frame
from numpyro_hbmeta.infer import checks as eb_checks
from numpyro_hbmeta.infer import sharding
from numpyro_hbmeta.infer.state import MetaEBResult
from numpyro_hbmeta.inner import TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import data_signature, trace_hidden

__all__ = ["CHECK_CHUNK_SIZE", "FitDiagnostics"]

#: Tasks per chunk of a full-data pass when neither the run's task batch (the chunk is at
#: least that) nor the caller names one.
CHECK_CHUNK_SIZE = 1024


def _take(data, indices):
    """Tasks ``indices`` of every task-major array: NumPy arrays gathered on the host (only
    the chunk reaches the device), device arrays by a compiled gather."""
    if data is None:
        return None
    # Only the task-major arrays: sizes and flags stay Python values (static to the model).
    arrays = {k: v for k, v in data.items() if hasattr(v, "shape") and np.ndim(v) >= 1}
    if all(isinstance(v, np.ndarray) for v in arrays.values()):
        taken = {k: jnp.asarray(v[indices]) for k, v in arrays.items()}
    else:
        taken = _take_jit(arrays, jnp.asarray(indices))
    return {**data, **taken}


_take_jit = jax.jit(take_tasks)


class FitDiagnostics:
    """End-of-run checks and the refused-step report of :class:`~numpyro_hbmeta.MetaEB`."""

    def _finish(self, state, losses, monitor: eb_checks.Monitor, support, query, *, loss_rtol,
                grad_rtol, batched, chunk_size=None) -> MetaEBResult:
        """The end of :meth:`~numpyro_hbmeta.MetaEB.run`: judge outer convergence, then the
        implicit prior and the boundary 0 of the scales at the fitted globals (warnings)."""
        params = self._constrained(state.params, support, query)
        inactive = monitor.inactive()
        convergence = eb_checks.outer_convergence(losses, monitor.last_grad_norm,
                                                  loss_rtol=loss_rtol, grad_rtol=grad_rtol,
                                                  batched=batched)
        if not convergence.converged:
            warnings.warn(
                f"MetaEB: the outer optimisation has not converged after {losses.size} steps: "
                f"{convergence.describe()}. Run longer (run(..., init_state=result.state) goes "
                "on from here), lower the learning rate if the loss oscillates, or use "
                "optax.lbfgs() for a deterministic objective.", stacklevel=3)
        # Full-data passes in chunks of at least the task batch: memory O(chunk), not O(J).
        self._warn_if_no_implicit_prior(params, support, query, chunk_size)
        boundary = tuple(n for n in self._boundary_or_warn(params, support, query, chunk_size)
                         if n not in inactive)
        if boundary:
            warnings.warn(
                f"MetaEB: the estimate of {', '.join(boundary)} is at its boundary 0 (the "
                "objective does not decrease when it is shrunk 1000-fold): empirical Bayes "
                "collapses the hierarchy there. Remedies: hyperprior=True (MAP-II) with a prior "
                "on the scale whose density vanishes at 0, e.g. Gamma(2, rate) (Chung et al. "
                "2013; a HalfNormal or HalfCauchy prior does not move the mode off 0), or "
                "full Bayes over the globals with NUTS on meta_marginal(...).", stacklevel=3)
        return MetaEBResult(params, losses, state, inactive, boundary,
                            convergence)

    # -- full-data passes, chunk by chunk ------------------------------------------------
    def _chunk_length(self, num_tasks: int, chunk_size: int | None = None) -> int:
        """Tasks per chunk: ``chunk_size`` (default :data:`CHECK_CHUNK_SIZE`), a multiple of
        the mesh's devices (a chunk is split over them), at most J (J ≤ chunk: one chunk, no
        padding)."""
        size = int(chunk_size or CHECK_CHUNK_SIZE)
        if size < 1:
            raise ValueError(f"chunk_size must be a positive number of tasks, got {chunk_size}")
        if self.mesh is not None:
            devices = self.mesh.shape[sharding.TASK_AXIS]
            size = -(-size // devices) * devices
        return min(size, num_tasks)

    def _chunks(self, support, query=None, chunk_size: int | None = None):
        """``(support, query, indices, valid)`` of each chunk of the tasks: ``indices`` their
        places among the J tasks, the last chunk padded with copies of task J − 1 that
        ``valid`` marks False (so every chunk has one shape: one compiled function)."""
        num_tasks = next(np.shape(v)[0] for v in support.values()
                         if hasattr(v, "shape") and np.ndim(v) >= 1)
        size = self._chunk_length(num_tasks, chunk_size)
        for start in range(0, num_tasks, size):
            indices = np.arange(start, start + size)
            valid = indices < num_tasks
            indices = np.minimum(indices, num_tasks - 1).astype(np.int32)
            yield _take(support, indices), _take(query, indices), indices, valid

    def _chunkable(self, support, query) -> Any:
        """The tasks plate's name when the loss can be summed chunk by chunk; ``None`` for a
        subsampled plate (its data are the subsample, whose indices the plate draws) and for
        data split over processes (the whole-data compiled loss sums over them)."""
        self._config(support, query, None)
        spec = self._structures[data_signature(support, query)]
        if self._processes or spec.size != spec.subsample_size:
            return None
        return spec.plate_name

    def _chunk_loss(self, unconstrained, support, query, indices, valid, first, *,
                    plate_name: str):
        """The loss's share of one chunk of tasks: the valid tasks' objectives, and the terms
        outside the tasks plate (log p(θ) with ``hyperprior``) in the ``first`` chunk only."""
        if self.mesh is not None:
            support, query, indices, valid = self._split_batch((support, query, indices,
                                                                valid))
        tr = self._trace(unconstrained, support, query, (plate_name, indices))
        total = 0.0
        for site in tr.values():
            if site["type"] != "sample" or (not site["is_observed"] and not self.hyperprior):
                continue
            log_prob = site["fn"].log_prob(site["value"])
            frames = [f for f in site.get("cond_indep_stack", ()) if f.name == plate_name]
            if frames:  # per task: the padding counts 0
                mask = valid.reshape((-1,) + (1,) * (-frames[0].dim - 1))
                log_prob = jnp.sum(jnp.where(mask, log_prob, 0.0))
            else:
                log_prob = jnp.where(first, jnp.sum(log_prob), 0.0)
            if site["scale"] is not None:
                log_prob = site["scale"] * log_prob
            total = total + log_prob
        return -total

    def _full_loss(self, unconstrained, support, query=None, *,
                   chunk_size: int | None = None) -> float:
        """:meth:`loss` over all J tasks, summed chunk by chunk (memory of one chunk); the
        same number as ``loss(unconstrained, support, query)`` up to the order of the sum."""
        plate_name = self._chunkable(support, query)
        if plate_name is None:
            return float(self._loss_jit(unconstrained, support, query))
        total, pending = 0.0, []
        for i, (chunk_support, chunk_query, indices, valid) in enumerate(
                self._chunks(support, query, chunk_size)):
            pending.append(self._chunk_loss_jit(unconstrained, chunk_support, chunk_query,
                                                indices, valid, i == 0,
                                                plate_name=plate_name))
            if len(pending) > 2:  # at most two chunks queued: memory stays O(chunk)
                total += float(pending.pop(0))
        return total + sum(float(x) for x in pending)

    def _per_task(self, fn, support, chunk_size: int | None = None) -> np.ndarray:
        """``fn(chunk_support)`` (one value per task) over every task, chunk by chunk."""
        out = [np.asarray(fn(chunk))[valid]
               for chunk, _, _, valid in self._chunks(support, None, chunk_size)]
        return np.concatenate(out)

    # -- end-of-run checks ----------------------------------------------------------------
    def _warn_if_no_implicit_prior(self, params, support, query, chunk_size=None) -> None:
        """Under MAML's implicit prior, warn when β·λ_max ≥ 1 at the fitted globals for some
        task: K steps of size β then imply no Gaussian prior, and ``task_posterior`` will
        refuse. Checked where it is cheap (d ≤ 64: exact per-task Hessians), chunk by
        chunk."""
        inner = self.inner
        spec = self._structures.get(data_signature(support, query))
        if not (isinstance(inner, TruncatedGD) and inner.prior == "implicit" and inner.num_steps
                and spec is not None and spec.dim <= 64):
            return
        params = dict(params)
        lam = self._per_task(lambda chunk: self._lambda_max_jit(params, chunk),
                             self._local(support), chunk_size)
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

    def _boundary_or_warn(self, params, support, query, chunk_size=None) -> tuple[str, ...]:
        try:
            return self.boundary_sites(params, support, query, chunk_size=chunk_size)
        except FloatingPointError as err:
            warnings.warn(f"MetaEB: {err}", stacklevel=4)
            return ()

    def boundary_sites(self, params: Mapping[str, Any], support, query=None, *,
                       chunk_size: int | None = None) -> tuple[str, ...]:
        """Positive globals whose estimate is at the boundary 0 of their support.

        A scale s is at the boundary when loss(s/1000) ≤ loss(s) + 1e-6·(1 + |loss(s)|): the
        objective's supremum is then approached as s → 0, not attained inside the support.
        Each loss is summed over the tasks in chunks of ``chunk_size`` (default
        :data:`CHECK_CHUNK_SIZE`; :meth:`run` uses at least its task batch), so memory does
        not grow with the number of tasks.

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
            return self._full_loss(unconstrained, support, query, chunk_size=chunk_size)

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

    def _report_chunk(self, params, support, query, indices, *, plate_name):
        """Per-task values of one chunk that the report of a refused step reads."""
        tr = self._trace(params, support, query,
                         None if plate_name is None else (plate_name, indices))
        site = tr[sites.OBJECTIVE]
        values = site["fn"].log_prob(site["value"])
        out = {"objective": values.reshape(values.shape[0], -1)[:, 0],
               "converged": tr[sites.INNER_CONVERGED]["value"],
               "globals": {k: tr[k]["value"] for k in params}}
        if sites.CURVATURE_MIN_EIGENVALUE in tr:
            out["eig"] = tr[sites.CURVATURE_MIN_EIGENVALUE]["value"]
        return out

    def failure_report(self, step: int, params, support, query, reason: str, *,
                       chunk_size: int | None = None) -> str:
        """The library's diagnosis of a refused step (argument validation off, so an
        invalid value cannot replace it with NumPyro's own error), over the tasks in chunks
        of ``chunk_size``."""
        lines = [f"MetaEB: step {step} was refused: {reason}."]
        params, support, query = self._local((params, support, query))
        self._config(support, query, None)
        spec = self._structures[data_signature(support, query)]
        plate_name = spec.plate_name if spec.size == spec.subsample_size else None
        if plate_name is None:  # a subsampled plate: its data are one chunk
            chunk_size = spec.subsample_size
        parts = []
        with numpyro.validation_enabled(False):
            for chunk_support, chunk_query, indices, valid in self._chunks(support, query,
                                                                           chunk_size):
                part = self._report_jit(params, chunk_support, chunk_query, indices,
                                        plate_name=plate_name)
                parts.append(jax.tree.map(lambda x, v=valid: np.asarray(x)[v],
                                          {k: v for k, v in part.items() if k != "globals"}))
                constrained = {k: np.asarray(v).round(4).tolist()
                               for k, v in part["globals"].items()}
        per_task = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        values = self._gathered(per_task["objective"])
        bad = np.nonzero(~np.isfinite(values))[0]
        if bad.size:
            lines.append(f"non-finite task objective(s) at task index(es) "
                         f"{bad[:20].tolist()}")
        if "eig" in per_task:
            eig = self._gathered(per_task["eig"])
            not_pd = np.nonzero(~(eig > 0))[0]
            if not_pd.size:
                lines.append(
                    f"curvature not positive definite for task(s) {not_pd[:20].tolist()} "
                    f"(smallest eigenvalues {eig[not_pd[:5]].round(6).tolist()}); use a "
                    "PSD curvature (ggn, kfac) or a convex task loss")
        converged = self._gathered(per_task["converged"])
        if not converged.all():
            lines.append(f"inner solver did not converge / diverged for task(s) "
                         f"{np.nonzero(~converged)[0][:20].tolist()}; "
                         + eb_checks.inner_remedy(self.inner))
        lines.append(f"globals at that step: {constrained}")
        return "\n".join(lines)

"""``MetaEB``: point estimates of the globals, the way meta-learning fits them.

Type-II maximum likelihood (empirical Bayes) maximises Σ_j objective_j(θ) over the globals;
with ``hyperprior=True`` it adds log p(θ) (MAP-II). With ``objective="maml"`` this is MAML's
meta-training (Grant et al., ICLR 2018, eq. 3), with ``"llama"`` LLAMA (§4), with
``"laplace"`` and :class:`~numpyro_hbmeta.Newton` the classical Laplace empirical Bayes of a
hierarchical model. The optimiser moves in unconstrained space (no Jacobian term: the
maximiser of a likelihood does not depend on the parametrisation).

The driver is built like NumPyro's ``SVI`` and BlackJAX's kernels: :meth:`MetaEB.init` gives a
:class:`MetaEBState`, :meth:`MetaEB.update` is one pure, jit-compiled optimiser step returning
``(state, StepInfo)``, and :meth:`MetaEB.run` is a thin loop over it: chunks of steps, each
one compiled ``lax.while_loop`` (one host sync per chunk, none per step), the same compiled
code on every call, with or without a progress bar, on fixed data or on a stream of fresh episodes
(``task_source``).

Step keys: ``run(rng_key, ...)`` splits ``key_init, key_steps = jax.random.split(rng_key)``
and step ``t`` (counted by ``state.step`` across resumed runs) uses
``jax.random.fold_in(key_steps, t)``; driving :meth:`update` by hand with those keys gives the
same numbers bit for bit, and ``run(k)`` then ``run(m, init_state=...)`` equals ``run(k + m)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from jax.sharding import Mesh
from numpyro import handlers
from numpyro.distributions.transforms import biject_to

from numpyro_hbmeta import sites, validate
from numpyro_hbmeta.data import sample_task_batch, take_tasks
from numpyro_hbmeta.infer import checks as eb_checks
from numpyro_hbmeta.infer import sharding
from numpyro_hbmeta.infer.diagnose import CHECK_CHUNK_SIZE, FitDiagnostics
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.posterior import TaskPosterior, laplace_task_posterior
from numpyro_hbmeta.infer.progress import Progress
from numpyro_hbmeta.infer.state import MetaEBResult, MetaEBState, StepInfo
from numpyro_hbmeta.infer.task_source import Episodes, TaskSource
from numpyro_hbmeta.inner import Newton, TruncatedGD, max_eigenvalue
from numpyro_hbmeta.marginal.meta_marginal import (
    MetaMarginal,
    data_signature,
    meta_marginal,
    model_structure,
)

__all__ = ["MetaEB", "TaskGaussian"]

#: The old name of the task posterior's type (it is one class for every curvature now).
TaskGaussian = TaskPosterior

#: Steps per compiled chunk of :meth:`MetaEB.run`; a shorter last chunk reuses the same
#: compiled code (the surplus iterations are skipped by a ``lax.cond``).
CHUNK_SIZE = 50



class _Config(NamedTuple):
    """Static facts of a step: they select the compiled code, never its inputs."""

    num_tasks: int
    batch_size: int | None
    plate_name: str


def _check_batch_splits(batch: int, devices: int, num_tasks: int) -> None:
    """A task batch is split over the mesh's devices, so it must be a multiple of them."""
    if batch % devices == 0:
        return
    below, above = batch // devices * devices, -(-batch // devices) * devices
    valid = [size for size in (below, above) if 0 < size <= num_tasks]
    raise validate.InputError(
        f"task_batch_size={batch} cannot be split evenly over the mesh's {devices} devices "
        f"(each device computes task_batch_size / {devices} of the batch's tasks); use a "
        f"multiple of {devices}: {' or '.join(map(str, valid))}")


def _strongly_typed(tree):
    """``tree`` with every weakly typed array made strongly typed (same dtype and values).

    Optimisers may start with weakly typed scalars (``optax.lbfgs``'s line-search info, from
    Python floats) that come out of a compiled step strongly typed; the state's abstract type
    would then change after the first chunk of :meth:`MetaEB.run` and compile the whole chunk
    a second time (the linear model with L-BFGS: 2 × 5 s).
    """
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype)
                        if getattr(x, "weak_type", False) else x, tree)


class MetaEB(FitDiagnostics):
    """Empirical Bayes over the globals of a hierarchical model with marginalised tasks.

    Args:
        model: the NumPyro model (globals outside, task sites inside ``hbm.tasks``).
        inner: :class:`TruncatedGD` or :class:`Newton`.
        objective: ``"maml"``, ``"llama"`` or ``"laplace"``.
        curvature: ``"full"``, ``"diag"``, or for ``llama`` ``"kfac"``/``"ggn"`` (or a
            configured ``KFAC(...)``/``GGN(...)``), as in :func:`meta_marginal`.
        optimizer: an optax ``GradientTransformation`` (default ``optax.adam(1e-2)``); ones
            that need ``value``/``grad``/``value_fn`` (``optax.lbfgs``) are supported.
        eta: LLAMA's η.
        hyperprior: add log p(θ) (MAP-II) instead of pure type-II maximum likelihood.
        mesh: shard the tasks over devices: a ``jax.sharding.Mesh`` with a ``"tasks"`` axis,
            ``"auto"`` for every device (``jax.devices()``), or ``None`` (default).
            :meth:`run` places the data split along the task axis and the globals replicated
            (:mod:`numpyro_hbmeta.infer.sharding`; :meth:`init` returns its state replicated,
            and a ``task_batch_size`` batch, a multiple of the devices, is split over them
            too); the numbers equal the unsharded run's up to the order of the sum over
            tasks. A mesh over the devices of several processes
            (``jax.distributed``; ``"auto"`` after ``jax.distributed.initialize()``) makes
            the data process-local: every process calls :meth:`run` alike with its own share
            of the tasks (the same number on each; process p's tasks follow process p − 1's
            in the global order), the checks run on each process's share, and every process
            gets the same globals. :meth:`task_posterior`, :meth:`sample_posterior` and
            :meth:`to_inference_data` then describe the process's own tasks.
    """

    def __init__(self, model: Callable, *, inner: TruncatedGD | Newton, objective: str,
                 curvature: str = "full", optimizer: optax.GradientTransformation | None = None,
                 eta: float = 1e-6, hyperprior: bool = False,
                 mesh: Mesh | str | None = None) -> None:
        self.model = model
        self.mesh = sharding.task_mesh(mesh)
        # Data split over processes: eager work sees this process's share (local_view) and
        # per-task host values are gathered; on one process none of this runs.
        self._processes = sharding.spans_processes(self.mesh)
        self.inner = inner
        self.marginal: MetaMarginal = meta_marginal(model, inner=inner, objective=objective,
                                                    curvature=curvature, eta=eta)
        self.curvature, self.eta = curvature, eta
        self._optimizer_given = optimizer
        self.optimizer = optax.with_extra_args_support(
            optax.adam(1e-2) if optimizer is None else validate.optimizer(optimizer))
        self.hyperprior = bool(hyperprior)
        # Compiled once per driver (jax.jit caches per shape and static config): a second
        # run, or a run after update, compiles nothing.
        self._update_jit = jax.jit(self._update, static_argnames=("config",))
        self._guarded_jit = jax.jit(self._guarded, static_argnames=("config",))
        self._chunk_jit = jax.jit(self._chunk, static_argnames=("config", "length"))
        self._loss_jit = jax.jit(self.loss)
        self._lambda_max_jit = jax.jit(self._lambda_max_at)
        # The full-data passes (diagnose.py): one compiled function per chunk size.
        self._chunk_loss_jit = jax.jit(self._chunk_loss, static_argnames=("plate_name",))
        self._report_jit = jax.jit(self._report_chunk, static_argnames=("plate_name",))
        self._structures: dict[tuple, Any] = {}
        self._layouts: dict[tuple, dict[str, tuple[tuple[int, ...], Any]]] = {}

    # -- the objective --------------------------------------------------------------------
    def _trace(self, unconstrained, support, query, plate_indices=None):
        plate_name = None if plate_indices is None else plate_indices[0]

        def substitute_fn(msg):
            if msg["type"] == "sample" and msg["name"] in unconstrained:
                return biject_to(msg["fn"].support)(unconstrained[msg["name"]])
            if msg["type"] == "plate" and msg["name"] == plate_name:
                return plate_indices[1]  # a batch of tasks keeps its indices in the J tasks
            return None

        with handlers.block(), handlers.trace() as tr, handlers.substitute(
                substitute_fn=substitute_fn):
            self.marginal(support, query)
        return tr

    def _objective(self, unconstrained, support, query, task_indices=None, *,
                   split_batch=False):
        """(−Σ_j objective_j [− log p(θ)], per-task inner flags (diverged, unconverged)).

        With ``task_indices`` (B of the J tasks of ``support``), the model sees those tasks'
        data and its tasks plate their indices in the J tasks (so per-task random numbers,
        e.g. the Fisher targets, do not depend on the batch), and the task objectives are
        scaled by J / B: an unbiased estimate of the full sum. ``split_batch`` (the compiled
        step, with a mesh) splits the gathered batch over the mesh's task axis.
        """
        scale = 1.0
        plate_indices = None
        if task_indices is not None:
            config = self._config(support, query, None)
            num_tasks, batch = config.num_tasks, jnp.shape(task_indices)[0]
            support = take_tasks(support, task_indices)
            query = None if query is None else take_tasks(query, task_indices)
            if split_batch and self.mesh is not None:
                support, query, task_indices = self._split_batch((support, query,
                                                                  task_indices))
            plate_indices, scale = (config.plate_name, task_indices), num_tasks / batch
        tr = self._trace(unconstrained, support, query, plate_indices)
        total = 0.0
        for site in tr.values():
            if site["type"] != "sample" or (not site["is_observed"] and not self.hyperprior):
                continue
            log_prob = jnp.sum(site["fn"].log_prob(site["value"]))
            if site["scale"] is not None:
                log_prob = site["scale"] * log_prob
            total = total + (scale * log_prob if site["name"] == sites.OBJECTIVE else log_prob)
        converged = tr[sites.INNER_CONVERGED]["value"]
        diverged = (tr[sites.INNER_DIVERGED]["value"] if sites.INNER_DIVERGED in tr
                    else ~converged)
        unconverged = (~converged & ~diverged if isinstance(self.inner, Newton)
                       else jnp.zeros_like(converged))
        return -total, (diverged, unconverged)

    def _split_batch(self, tree):
        """Every per-task array of a gathered task batch split over the mesh's task axis.

        Without this the gather's output has no layout XLA must keep: it chose to replicate
        the batch, and every device computed all B tasks. The indices are drawn before (the
        same batch as without a mesh); only where each task of it is computed changes.
        """
        split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
            sharding.TASK_AXIS))
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, split)
            if hasattr(x, "shape") and jnp.ndim(x) >= 1 else x, tree)

    def loss(self, unconstrained: Mapping[str, jnp.ndarray], support, query=None, *,
             task_indices=None):
        """−Σ_j objective_j (scaled by the tasks plate), − log p(θ) if ``hyperprior``.

        Args:
            unconstrained: unconstrained values of the global sites.
            support: the support data (all J tasks).
            query: the query data, or ``None``.
            task_indices: a batch of B task indices: the loss of those tasks, their
                objectives scaled by J / B (what a step with ``task_batch_size`` descends).
        """
        return self._objective(unconstrained, support, query, task_indices)[0]

    # -- the pure step --------------------------------------------------------------------
    def init(self, rng_key, support, query=None, init_params=None) -> MetaEBState:
        """Unconstrained start: ``init_params`` (constrained) or uniform(−2, 2), as NumPyro's
        ``init_to_uniform``, and the optimiser state.

        Raises:
            ValueError: ``init_params`` names a non-global site, has the wrong shape, or a
                value outside the site's support (e.g. a negative scale).
        """
        support = validate.task_data(self._local(support), "support")
        globals_ = self._global_layout(support)
        init_params = dict(init_params or {})
        unknown = sorted(set(init_params) - set(globals_))
        if unknown:
            raise validate.InputError(f"init_params has {unknown}, which are not global sites "
                                      f"of the model (global sites: {list(globals_)})")
        params = {}
        keys = jax.random.split(rng_key, max(len(globals_), 1))
        for key, (name, (site_shape, support_)) in zip(keys, globals_.items(), strict=False):
            transform = biject_to(support_)
            if name in init_params:
                value = jnp.asarray(init_params[name], dtype=jnp.result_type(float))
                if value.shape != site_shape:
                    raise validate.InputError(
                        f"init_params[{name!r}] has shape {value.shape}, but global site "
                        f"{name!r} has shape {site_shape}")
                if not bool(jnp.all(support_(value))) or not bool(jnp.all(jnp.isfinite(value))):
                    raise validate.InputError(
                        f"init_params[{name!r}] = {np.asarray(value).tolist()} is outside the "
                        f"support of global site {name!r} ({support_}); pass a constrained value")
                params[name] = transform.inv(value)
            else:
                shape = transform.inverse_shape(site_shape)
                params[name] = jax.random.uniform(key, shape, minval=-2.0, maxval=2.0)
        state = MetaEBState(params, _strongly_typed(self.optimizer.init(params)),
                            jnp.zeros((), jnp.int32))
        # With a mesh, the layout update expects: every device holds the whole state.
        return state if self.mesh is None else sharding.replicate(state, self.mesh)

    def _global_layout(self, support) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Shape and support of each global site, once per data signature.

        Read off an abstract trace of the model (``jax.make_jaxpr``): no eager operation runs,
        so nothing is compiled before the step (tracing the model eagerly compiled ~20 small
        programs, 0.6 s of a 4 s first step on the linear model). A model that needs concrete
        values (Python control flow on its data), or whose supports depend on other sites'
        values, is traced concretely instead.
        """
        key = data_signature(support)
        if key in self._layouts:
            return self._layouts[key]
        found: dict[str, tuple[tuple[int, ...], Any]] = {}

        def layout(sites_) -> dict[str, tuple[tuple[int, ...], Any]]:
            return {n: (tuple(jnp.shape(s["value"])), s["fn"].support)
                    for n, s in sites_.items()}

        def abstract() -> int:
            found.update(layout(self._global_sites(jax.random.PRNGKey(0), support)))
            return 0

        try:
            jax.make_jaxpr(abstract)()
        except jax.errors.JAXTypeError:  # concrete values needed: trace eagerly below
            found.clear()
        traced = any(isinstance(leaf, jax.core.Tracer) for _, support_ in found.values()
                     for leaf in jax.tree.leaves(getattr(support_, "__dict__", {})))
        if not found or traced:
            found = layout(self._global_sites(jax.random.PRNGKey(0), support))
        self._layouts[key] = found
        return found

    def update(self, state: MetaEBState, rng_key, support, query=None, *,
               task_batch_size: int | None = None) -> tuple[MetaEBState, StepInfo]:
        """One optimiser step on −Σ_j objective_j; pure and compiled once per data shape.

        Args:
            state: from :meth:`init` or a previous update.
            rng_key: this step's key (it draws the task batch).
            support: the model's keyword arguments for the support set, task-major.
            query: the same for the query set (``maml``/``llama``).
            task_batch_size: optimise on this many tasks drawn without replacement, the
                likelihood scaled by J / batch (an unbiased estimate of the full objective).

        Returns:
            ``(new_state, info)``; ``info.ok`` is False when the step is meaningless (the new
            state is then not to be trusted; :meth:`run` refuses it and raises).
        """
        config = self._config(support, query, task_batch_size)
        return self._update_jit(state, rng_key, support, query, config=config)

    def _config(self, support, query, task_batch_size) -> _Config:
        key = data_signature(support, query)
        spec = self._structures.get(key)
        if spec is None:
            spec = self._structures[key] = model_structure(self.model, support)
        if self._processes and spec.size != spec.subsample_size:
            raise validate.InputError(
                f"a subsampled tasks plate (size {spec.size}, subsample_size "
                f"{spec.subsample_size}) cannot be split over processes; give the plate every "
                "task and use run(..., task_batch_size=...) instead")
        batch = validate.task_batch_size(task_batch_size, spec.subsample_size)
        if batch is not None and self.mesh is not None:
            _check_batch_splits(batch, self.mesh.shape[sharding.TASK_AXIS],
                                spec.subsample_size)
        if batch is not None and spec.size != spec.subsample_size:
            raise ValueError("task_batch_size cannot be combined with a subsampled tasks plate "
                             f"(the model's plate has size {spec.size} and subsample_size "
                             f"{spec.subsample_size})")
        return _Config(spec.subsample_size, batch, spec.plate_name)

    def shard(self, support, query=None) -> tuple[dict, dict | None]:
        """Validated data, split along the task axis over ``mesh`` when the driver has one
        (what :meth:`run` does with the data it is given). With a mesh over several
        processes, ``support``/``query`` are this process's share and the result is the
        global data (a collective: every process calls it)."""
        support = validate.task_data(support, "support")
        query = None if query is None else validate.task_data(query, "query")
        if self.mesh is None:
            return support, query
        return (sharding.shard_tasks(support, self.mesh, "support"),
                None if query is None else sharding.shard_tasks(query, self.mesh, "query"))

    def _local(self, tree):
        """This process's part of ``tree`` when the data are split over processes."""
        return sharding.local_view(tree) if self._processes else tree

    def _host(self, tree):
        """Arrays of a compiled step's output, whole on the host of every process."""
        return eb_checks.to_numpy(sharding.to_host(tree) if self._processes else tree)

    def _gathered(self, per_task) -> np.ndarray:
        """Per-task values computed on this process's tasks, over all tasks."""
        return sharding.gather_tasks(per_task, self.mesh)

    def _update(self, state: MetaEBState, rng_key, support, query, *, config: _Config
                ) -> tuple[MetaEBState, StepInfo]:
        indices = None
        if config.batch_size is not None:
            indices = sample_task_batch(rng_key, config.num_tasks, config.batch_size)
            if self.mesh is not None:
                # Whole on every device: the split of the batch (_split_batch) must not
                # propagate back into the sampling loop, whose every step would then be a
                # collective over the devices (B of them: linear-maml, B = 128, 4 host
                # devices: 17.8 ms a step against 3.2 ms).
                indices = jax.lax.with_sharding_constraint(indices, jax.sharding.NamedSharding(
                    self.mesh, jax.sharding.PartitionSpec()))

        def value_fn(params):
            return self._objective(params, support, query, indices, split_batch=True)[0]

        (value, (diverged, unconverged)), grads = jax.value_and_grad(
            lambda p: self._objective(p, support, query, indices, split_batch=True),
            has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(
            grads, state.opt_state, state.params, value=value, grad=grads, value_fn=value_fn)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        threshold = eb_checks.overflow_threshold(jnp.result_type(grad_norm))
        finite_params = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                           for p in jax.tree.leaves(params)]))
        ok = jnp.isfinite(value) & jnp.isfinite(grad_norm) & (grad_norm < threshold) \
            & finite_params
        info = StepInfo(
            loss=value, grad_norm=grad_norm,
            num_diverged=jnp.sum(diverged).astype(jnp.int32),
            num_unconverged=jnp.sum(unconverged).astype(jnp.int32),
            diverged_tasks=eb_checks.first_tasks(diverged, indices),
            unconverged_tasks=eb_checks.first_tasks(unconverged, indices),
            active={name: jnp.any(g != 0) for name, g in grads.items()},
            ok=ok)
        return MetaEBState(params, opt_state, state.step + 1), info

    def _guarded(self, state, key_steps, support, query, *, config: _Config):
        """One step of a run. A step that is not ok leaves the state where it was, so the
        diagnosis sees the globals that produced the failure."""
        new_state, info = self._update(state, jax.random.fold_in(key_steps, state.step),
                                       support, query, config=config)
        state = jax.tree.map(lambda new, old: jnp.where(info.ok, new, old), new_state, state)
        return state, info

    def _chunk(self, state, key_steps, num_active, support, query, *, config: _Config,
               length: int):
        """Up to ``length`` steps in one compiled loop (``num_active`` of them, fewer if a
        step fails), their infos in a buffer of ``length`` (a dynamic count keeps one
        compiled program for every chunk, the last shorter one included)."""
        shapes = jax.eval_shape(lambda s: self._guarded(s, key_steps, support, query,
                                                        config=config)[1], state)
        buffer = jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), shapes)

        def cond(carry):
            i, _, infos = carry
            return (i < num_active) & ((i == 0) | infos.ok[jnp.maximum(i - 1, 0)])

        def body(carry):
            i, state, infos = carry
            state, info = self._guarded(state, key_steps, support, query, config=config)
            infos = jax.tree.map(lambda b, x: b.at[i].set(x), infos, info)
            return i + 1, state, infos

        count, state, infos = jax.lax.while_loop(cond, body, (jnp.asarray(0), state, buffer))
        return state, infos, jnp.arange(length) < count

    # -- fitting --------------------------------------------------------------------------
    def run(self, rng_key, num_steps: int, support: Mapping[str, Any] | None = None,
            query: Mapping[str, Any] | None = None, *, task_source: TaskSource | None = None,
            task_batch_size: int | None = None, progress_bar: bool = True,
            init_params: Mapping[str, Any] | None = None,
            init_state: MetaEBState | None = None, loss_rtol: float = 1e-4,
            grad_rtol: float = 1e-3, final_checks: bool = True) -> MetaEBResult:
        """Maximise the objective for ``num_steps`` optimiser steps.

        Args:
            rng_key: PRNG key (start, task batches, episodes).
            num_steps: optimiser steps (a positive integer).
            support: fixed support data (the model's keyword arguments, task-major).
            query: fixed query data (``maml``/``llama``).
            task_source: instead of ``support``/``query``, fresh episodes each step: a
                function ``(rng_key, step) -> (support, query)`` (called with
                ``fold_in(key_source, step)``, ``key_source = split(rng_key, 3)[2]``) or
                an iterator of ``(support, query)`` pairs. Shapes must stay fixed (no
                retrace).
            task_batch_size: optimise on random batches of this many tasks.
            progress_bar: a bar on a terminal, plain lines elsewhere.
            init_params: constrained start values of some or all globals.
            init_state: go on from a previous ``result.state`` (``init_params`` ignored);
                ``run(key, k)`` then ``run(key, m, init_state=...)`` equals ``run(key, k + m)``.
            loss_rtol: outer convergence: bound on the relative change of the windowed loss.
            grad_rtol: outer convergence: bound on ‖∇‖ / max(1, |loss|).
            final_checks: judge outer convergence and check scales for the boundary 0 at
                the end (``False`` for a segment of a longer run that will be resumed).

        Raises:
            FloatingPointError: the objective became non-finite, or its gradient overflows;
                the message names the step and the tasks whose inner solve diverged or whose
                curvature is not positive definite.

        Warns:
            UserWarning: once per kind and run, inner solves that diverged or did not converge
                (tasks, step and a remedy with numbers); an outer optimisation that has not
                converged; a scale at its boundary 0.
        """
        num_steps = validate.positive_int(num_steps, "num_steps")
        if task_source is not None and (support is not None or query is not None):
            raise ValueError("run takes either support/query data or a task_source, not both")
        if task_source is None and support is None:
            raise ValueError("run needs support data (or a task_source of fresh episodes)")
        key_init, key_steps = jax.random.split(rng_key)
        source = None
        if task_source is not None:
            source = Episodes(task_source, jax.random.split(rng_key, 3)[2])
            start = 0 if init_state is None else int(init_state.step)
            support, query = source.get(start)
        support, query = self.shard(support, query)
        probe = dict(init_params or {})
        if init_state is not None:
            probe = self._constrained(init_state.params, support, query)
        self.marginal.check(*self._local((support, query)), rng_key=key_init,
                            params=probe or None, params_name="init_params")
        config = self._config(support, query, task_batch_size)
        state = (self.init(key_init, support, query, init_params) if init_state is None
                 else _strongly_typed(init_state))
        if self.mesh is not None and init_state is not None:  # init's is replicated already
            state = sharding.replicate(state, self.mesh)
        monitor = eb_checks.Monitor(self, key_steps)
        losses: list[np.ndarray] = []
        with Progress(num_steps, f"MetaEB {self.marginal.objective}",
                      enabled=progress_bar) as bar:
            done = 0
            while done < num_steps:
                n = min(CHUNK_SIZE, num_steps - done)
                if source is None:
                    state, infos, ran = self._chunk_jit(state, key_steps, n, support, query,
                                                        config=config, length=CHUNK_SIZE)
                    infos, ran = self._host((infos, ran))
                    step_data = None
                else:
                    state, infos, ran, step_data = self._stream(state, source, key_steps, n,
                                                                config)
                monitor.check(infos, ran, state, support, query, step_data)
                losses.append(infos.loss[ran])
                done += n
                bar.update(n, loss=f"{float(infos.loss[ran][-1]):.4g}")
        losses = np.concatenate(losses)
        if not final_checks:
            params = self._constrained(state.params, support, query)
            return MetaEBResult(params, losses, state, monitor.inactive())
        return self._finish(state, losses, monitor, support, query,
                            loss_rtol=loss_rtol, grad_rtol=grad_rtol,
                            batched=config.batch_size is not None or source is not None,
                            chunk_size=max(config.batch_size or 0, CHECK_CHUNK_SIZE))

    def _stream(self, state, source: Episodes, key_steps, n: int, config: _Config):
        """``n`` steps on fresh episodes: one dispatch per step, one host sync per chunk."""
        infos, data = [], []
        first = int(state.step)  # one host sync per chunk
        for i in range(n):
            support, query = self.shard(*source.get(first + i))
            data.append((support, query))
            state, info = self._guarded_jit(state, key_steps, support, query, config=config)
            infos.append(info)
        infos = self._host(jax.tree.map(lambda *x: jnp.stack(x), *infos))
        # After a refused step the state stays put; the monitor raises on the first one.
        ran = np.ones(n, bool)
        return state, infos, ran, data

    def _lambda_max_at(self, params, support):
        context = context_at(self.model, params, support)
        return max_eigenvalue(self.marginal.inner_loss(context, support), context.phi0)

    def _constrained(self, params, support, query) -> dict[str, jnp.ndarray]:
        # Supports may depend on other globals, so constrain along a trace of the model.
        def substitute_fn(msg):
            if msg["type"] == "sample" and msg["name"] in params:
                return biject_to(msg["fn"].support)(params[msg["name"]])
            return None

        params, support = self._local((params, support))
        with numpyro.validation_enabled(False):
            found = self._global_sites(jax.random.PRNGKey(0), support, substitute_fn)
        return {name: found[name]["value"] for name in params}

    # -- task posteriors ------------------------------------------------------------------
    def task_posterior(self, params: Mapping[str, Any], support: Mapping[str, Any]
                       ) -> TaskPosterior:
        """The Laplace Gaussian of each task's flat unconstrained parameters at φ̂_j, with the
        driver's own curvature (:func:`~numpyro_hbmeta.infer.posterior.laplace_task_posterior`).

        Precision: the curvature of the negative log joint at φ̂_j (explicit prior, Newton);
        under MAML's implicit prior, the implicit prior's precision plus the curvature of the
        support negative log-likelihood at φ̂_j (Grant et al. 2018, §3.2 and §4).

        Raises:
            FloatingPointError: the precision is not positive definite for some tasks (named,
                with their smallest eigenvalues).
        """
        support = validate.task_data(self._local(support), "support")
        with numpyro.validation_enabled(False):  # our report, not NumPyro's, on bad values
            return laplace_task_posterior(self.marginal, dict(params), support)

    def to_inference_data(self, result: MetaEBResult, support: Mapping[str, Any], *,
                          rng_key=None, num_samples: int = 1000, task_labels=None,
                          query: Mapping[str, Any] | None = None):
        """ArviZ ``InferenceData`` of a fit: the point-estimated globals (repeated, sd 0) and
        ``num_samples`` draws of every task site from :meth:`task_posterior`, with a ``tasks``
        dimension (see :func:`numpyro_hbmeta.to_inference_data`). Globals the objective does
        not depend on (``result.inactive_sites``) are not estimates: NaN, listed with the
        reason in the posterior's attributes."""
        from numpyro_hbmeta.infer.results import FitResult
        from numpyro_hbmeta.output.inference_data import to_inference_data

        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        draws = self.sample_posterior(rng_key, result.params, support, num_samples)
        samples = {k: np.asarray(v)[None] for k, v in draws.items()}
        for name in result.inactive_sites:  # the start value, not an estimate
            samples[name] = np.full_like(samples[name], np.nan, dtype=float)
        info: dict[str, Any] = {"inactive_sites": result.inactive_sites}
        if result.inactive_sites:
            info["inactive_reason"] = eb_checks.INACTIVE_REASON.format(
                objective=self.marginal.objective)
        if len(result.losses):
            info["final_loss"] = float(result.losses[-1])
        fit = FitResult(self.marginal.objective, self.model, dict(support), samples,
                        point_sites=tuple(result.params), info=info,
                        approximate="point estimate of the globals (empirical Bayes)")
        return to_inference_data(fit, task_labels=task_labels, query=query)

    def sample_posterior(self, rng_key, params: Mapping[str, Any], support: Mapping[str, Any],
                         num_samples: int) -> dict[str, jnp.ndarray]:
        """Draws of every task site (constrained) from :meth:`task_posterior`, plus the
        globals repeated, each with a leading (num_samples,) axis."""
        num_samples = validate.positive_int(num_samples, "num_samples")
        posterior = self.task_posterior(params, support)
        draws = posterior.to_sites(posterior.sample(rng_key, (num_samples,)))
        for name, value in params.items():
            value = jnp.asarray(value)
            draws[name] = jnp.broadcast_to(value, (num_samples, *value.shape))
        return draws

    # -- persistence ----------------------------------------------------------------------
    def save(self, path, result: MetaEBResult) -> None:
        """Write a fit to ``path`` (``.npz``): the globals, the optimiser state, the step,
        the losses, the checks and the driver's settings (see
        :mod:`numpyro_hbmeta.infer.persist`)."""
        from numpyro_hbmeta.infer.persist import save_fit

        save_fit(path, self, result)

    @classmethod
    def load(cls, path, model: Callable, *, optimizer: optax.GradientTransformation | None = None
             ) -> tuple[MetaEB, MetaEBResult]:
        """Read a fit written by :meth:`save`: the driver (rebuilt from the saved settings on
        ``model``, with ``optimizer`` of the same structure as the saved state; default
        Adam) and the result, ready for ``sample_posterior`` or ``run(init_state=...)``."""
        from numpyro_hbmeta.infer.persist import load_fit

        return load_fit(path, model, optimizer=optimizer, driver_class=cls)

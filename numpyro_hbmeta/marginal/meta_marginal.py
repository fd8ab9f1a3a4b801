"""``meta_marginal``: a NumPyro model over the globals θ alone, with every task marginalised.

Grant et al. (ICLR 2018, §3, eq. 2-4) write meta-learning as empirical Bayes in

    p(θ) Π_j ∫ p(D_j | φ_j) p(φ_j | θ) dφ_j,

with the integral replaced by a point estimate φ̂_j = inner(θ, support_j). This module turns
the user's hierarchical model into ``marginal(support, query=None)``, whose latent sites are
the global ones and whose log density is log p(θ) plus, under the tasks plate, one factor per
task:

* ``"maml"``:    log p(query_j | φ̂_j)                                 (eq. 3, MAML)
* ``"llama"``:   log p(query_j | φ̂_j) − η log det Ĥ_j                  (§4, LLAMA)
* ``"laplace"``: log p(D_j | φ̂_j) + log p(φ̂_j | θ) + (d/2) log 2π − ½ log det H_j
                 (the Laplace evidence, eq. 4; exact for linear-Gaussian tasks with Newton)

How it runs: a first pass of the model hides the task sites from outer handlers (giving the
latent ones their prior mean, the inner solvers' start), so an outer sampler sees and sets the
globals only. Then the per-task log densities are re-evaluated as functions of the flat
unconstrained task parameters (:mod:`numpyro_hbmeta.marginal.density`), solved, and the objective is
emitted with ``numpyro.factor`` inside a tasks plate with the same subsample indices (so it is
scaled like the model's task sites), together with φ̂_j as deterministic sites under the task
sites' own names and the inner/curvature diagnostics (``hbm_*`` sites).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_uniform
from numpyro.primitives import Messenger

from numpyro_hbmeta import sites, validate
from numpyro_hbmeta.curvature import curvature_builder
from numpyro_hbmeta.handlers import is_task_frame, tasks
from numpyro_hbmeta.inner import InnerInfo, Newton, TruncatedGD
from numpyro_hbmeta.marginal.density import (
    ProbePointError,
    TaskLogDensity,
    check_task_independence,
    flatten,
    probe_task_independence,
    task_log_density,
    unflatten,
)
from numpyro_hbmeta.marginal.fisher import TaskObservations
from numpyro_hbmeta.marginal.spec import TaskSpec, check_model_arguments, check_task_axis, task_spec

__all__ = ["OBJECTIVES", "MetaMarginal", "TaskContext", "meta_marginal"]

OBJECTIVES = ("maml", "llama", "laplace")
OBJECTIVE_SITE = sites.OBJECTIVE


class _hide_tasks(Messenger):  # noqa: N801 - a handler, named like numpyro's
    """Stop task sites from reaching outer handlers; latent ones take their prior mean."""

    def process_message(self, msg) -> None:
        if msg["type"] != "sample" or not any(
                is_task_frame(f) for f in msg.get("cond_indep_stack", ())):
            return
        if not msg["is_observed"]:
            msg["value"] = _prior_mean(msg)
        msg["stop"] = True


def _prior_mean(msg) -> jnp.ndarray:
    fn = msg["fn"]
    if fn.support.is_discrete:
        return fn.sample(jax.random.PRNGKey(0))  # task_spec rejects it with a clear error
    try:
        mean = jnp.asarray(fn.mean)
    except NotImplementedError as err:
        raise validate.InputError(
            f"task site {msg['name']!r}: {type(fn).__name__} has no mean, and the inner solver "
            "starts every task at the mean of p(φ_j | θ)") from err
    if not jnp.issubdtype(mean.dtype, jnp.inexact):
        # dist.Normal(0, tau): an integer mean; the solvers move in floating point
        mean = mean.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    return jnp.broadcast_to(mean, fn.shape())


def _arrays_and_rest(data: Mapping[str, Any] | None):
    """(the array arguments, the others as a sorted tuple of items; ``None`` for no data)."""
    if data is None:
        return None, None
    arrays = {k: v for k, v in data.items() if isinstance(v, jax.Array | np.ndarray)}
    return arrays, tuple(sorted((k, v) for k, v in data.items() if k not in arrays))


class TaskContext(NamedTuple):
    """Everything about one data set at fixed globals that the objectives need.

    Attributes:
        spec: the model's task structure.
        globals_: constrained global values.
        indices: subsample indices of the tasks plate.
        phi0: (tasks, d) unconstrained start, E[φ_j | θ].
        transforms: unconstrained -> constrained map per task site.
    """

    spec: TaskSpec
    globals_: dict[str, jnp.ndarray]
    indices: jnp.ndarray
    phi0: jnp.ndarray
    transforms: dict[str, Any]

    def log_density(self, model: Callable, data: Mapping[str, Any]
                    ) -> Callable[[jnp.ndarray], TaskLogDensity]:
        """Φ -> per-task log-likelihood and log prior on ``data``."""
        return lambda phi: task_log_density(model, self.spec, self.globals_, self.indices,
                                            data, phi)

    def observations(self, model: Callable, data: Mapping[str, Any]) -> TaskObservations:
        """The model's observation sites on ``data`` as functions of Φ (for kfac and ggn)."""
        return TaskObservations(model, self.spec, self.globals_, self.indices, data)

    def constrained(self, phi: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """(..., tasks, d) -> constrained task site values (leading axes kept)."""
        if phi.ndim > 2:
            return jax.vmap(self.constrained)(phi)
        return {name: self.transforms[name](value)
                for name, value in unflatten(self.spec, phi).items()}


def trace_hidden(model: Callable, data: Mapping[str, Any]) -> dict[str, Any]:
    """Trace ``model(**data)`` with its task sites hidden from outer handlers."""
    with _hide_tasks(), handlers.trace() as tr:
        model(**data)
    return tr


def trace_globals(model: Callable, data: Mapping[str, Any]) -> TaskContext:
    """Run the model with its task sites hidden and read off the task structure and globals.

    Outer handlers (a sampler's substitute, a seed) see and set the global sites only.
    """
    return context_from_trace(trace_hidden(model, data))


def context_from_trace(tr: Mapping[str, Any]) -> TaskContext:
    """The :class:`TaskContext` of a trace of the model with its task sites hidden."""
    spec = task_spec(tr)
    globals_ = {name: tr[name]["value"] for name in spec.global_sites}
    plate_site = tr.get(spec.plate_name)
    indices = (plate_site["value"] if plate_site is not None
               else np.arange(spec.subsample_size))
    transforms = {s.name: biject_to(tr[s.name]["fn"].support) for s in spec.task_sites}
    phi0 = flatten(spec, {s.name: transforms[s.name].inv(tr[s.name]["value"])
                          for s in spec.task_sites})
    return TaskContext(spec, globals_, indices, phi0, transforms)


def model_structure(model: Callable, data: Mapping[str, Any], what: str = "data"
                    ) -> TaskSpec:
    """The model's :class:`TaskSpec` on ``data``, from an abstract (shape-only), isolated run.

    Run before the real pass, so a malformed model fails here with a clear error rather than
    inside an outer handler (e.g. a latent site outside any tasks plate with no value). An
    error that JAX or NumPyro raise while the model runs is re-raised naming ``what`` and the
    shapes of the data.
    """
    found = []

    def structure():
        with handlers.block(), handlers.seed(rng_seed=0), _hide_tasks(), \
                handlers.trace() as tr:
            model(**data)
        found.append(task_spec(tr))

    try:
        with numpyro.validation_enabled(False):  # shapes only; values are checked later
            jax.eval_shape(structure)
    except validate.InputError:
        raise
    except (ValueError, TypeError, IndexError, AssertionError) as err:
        shapes = {k: tuple(jnp.shape(v)) if hasattr(v, "shape") else v for k, v in data.items()}
        raise validate.InputError(
            f"the model failed on {what} {shapes}: {type(err).__name__}: {err}") from err
    return found[0]


def _check_data(model, data, what: str) -> TaskSpec:
    check_model_arguments(model, data, what)
    spec = model_structure(model, data, what)
    check_task_axis(data, _data_tasks(spec, data), what)
    return spec


def _data_tasks(spec: TaskSpec, data) -> int:
    # A model may index full-size data with the plate's subsample indices, or be handed
    # data already sliced to the subsample (MetaEB's task_batch_size).
    sizes = {jnp.shape(v)[0] for v in data.values() if hasattr(v, "shape") and jnp.ndim(v)}
    return spec.size if spec.size in sizes else spec.subsample_size


class MetaMarginal:
    """The model over θ built by :func:`meta_marginal`; call it like a NumPyro model."""

    def __init__(self, model: Callable, *, inner: TruncatedGD | Newton, objective: str,
                 curvature: Any, eta: float) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.build = curvature_builder(curvature)
        if objective == "laplace" and getattr(self.build, "likelihood_only", False):
            raise ValueError(
                f"curvature={curvature!r} approximates the Fisher of the log-likelihood, but "
                "objective='laplace' needs the curvature of the log joint (likelihood and "
                "prior); use it with objective='llama', or curvature='full'/'diag' for laplace")
        if not isinstance(inner, TruncatedGD | Newton):
            raise TypeError(f"inner must be TruncatedGD(...) or Newton(...), got {inner!r}")
        if isinstance(inner, TruncatedGD):
            validate.positive_number(inner.step_size, "TruncatedGD: step_size")
        eta = validate.positive_number(eta, "eta", allow_zero=True)
        self.model, self.inner, self.objective = model, inner, objective
        self.curvature, self.eta = curvature, eta
        # Data signatures (tree structure, shapes, dtypes) whose tasks were found independent.
        self._independent: set[tuple] = set()
        # The jitted inner solve and objective, per task structure and static arguments.
        self._cores: dict[tuple, Callable] = {}

    def __repr__(self) -> str:
        return (f"meta_marginal({getattr(self.model, '__name__', self.model)!r}, inner="
                f"{self.inner!r}, objective={self.objective!r}, curvature={self.curvature!r})")

    # -- pieces ---------------------------------------------------------------------------
    def structure(self, support: Mapping[str, Any], query: Mapping[str, Any] | None = None
                  ) -> TaskSpec:
        """Validate both data sets against the model (shape-only runs); the task structure."""
        if self.objective in ("maml", "llama") and query is None:
            raise validate.InputError(
                f"objective={self.objective!r} scores the query set, and none was passed: "
                "pass marginal(support, query), or MetaEB.run(rng_key, num_steps, support, "
                "query)")
        if self.objective == "laplace" and query is not None:
            raise validate.InputError(
                "objective='laplace' is the evidence of the support data, but a query was "
                "passed; pass all of a task's data as support (e.g. TaskData.all_data())")
        spec = _check_data(self.model, support, "support")
        if query is not None:
            self._check_query(spec, query)
        return spec

    def context(self, support: Mapping[str, Any], query: Mapping[str, Any] | None = None
                ) -> TaskContext:
        """Trace the globals on ``support`` and validate both data sets against the model."""
        self.structure(support, query)
        return trace_globals(self.model, support)

    def _check_query(self, spec: TaskSpec, query) -> None:
        check_model_arguments(self.model, query, "query")
        query_spec = model_structure(self.model, query, "query")
        if query_spec.subsample_size != spec.subsample_size:
            raise validate.InputError(f"support has {spec.subsample_size} tasks but query has "
                                      f"{query_spec.subsample_size}")
        for a, b in zip(spec.task_sites, query_spec.task_sites, strict=True):
            if a.shape != b.shape:
                raise validate.InputError(
                    f"task site {a.name!r} has shape {a.shape} on the support set but "
                    f"{b.shape} on the query set")
        check_task_axis(query, _data_tasks(spec, query), "query")

    def inner_loss(self, context: TaskContext, support) -> Callable:
        """The per-task loss the inner solver descends."""
        density = context.log_density(self.model, support)
        if self.inner.prior == "implicit":
            return lambda phi: -density(phi).log_lik
        return lambda phi: -density(phi).log_joint

    def solve(self, context: TaskContext, support) -> tuple[jnp.ndarray, InnerInfo]:
        """φ̂ (tasks, d) and the inner diagnostics."""
        return self.inner.solve(self.inner_loss(context, support), context.phi0)

    def task_objective(self, context: TaskContext, phi_hat: jnp.ndarray, support, query=None):
        """Per-task objective (tasks,) and the smallest curvature eigenvalue (or None)."""
        if self.objective == "maml":
            return context.log_density(self.model, query)(phi_hat).log_lik, None
        build = self.build
        if self.objective == "llama":
            query_nll = lambda p: -context.log_density(self.model, query)(p).log_lik  # noqa: E731
            curvature = build(query_nll, phi_hat, context.observations(self.model, query))
            value = -query_nll(phi_hat) - self.eta * curvature.logdet()
            return value, curvature.min_eigenvalue()
        neg_joint = lambda p: -context.log_density(self.model, support)(p).log_joint  # noqa: E731
        curvature = build(neg_joint, phi_hat, context.observations(self.model, support))
        half_log_2pi = 0.5 * context.spec.dim * math.log(2 * math.pi)
        value = -neg_joint(phi_hat) + half_log_2pi - 0.5 * curvature.logdet()
        return value, curvature.min_eigenvalue()

    # -- the model ------------------------------------------------------------------------
    def __call__(self, support: Mapping[str, Any], query: Mapping[str, Any] | None = None
                 ) -> None:
        support = validate.task_data(support, "support")
        query = None if query is None else validate.task_data(query, "query")
        if not any(isinstance(leaf, jax.core.Tracer)
                   for leaf in jax.tree_util.tree_leaves((support, query))):
            # Concrete data: a first trace by NUTS/SVI/Predictive, or an eager call. The
            # check is cached by data signature; values are checked for NaNs each time.
            with jax.ensure_compile_time_eval():
                self._check_implicitly(support, query)
        context = self.context(support, query)
        phi_hat, value, info, min_eigenvalue = self._solve_and_score(context, support, query)
        self._emit(context, phi_hat, value, info, min_eigenvalue)

    def _solve_and_score(self, context: TaskContext, support, query):
        """φ̂, the per-task objective, the inner diagnostics and the smallest curvature
        eigenvalue, as one jitted function of the globals and the data arrays.

        Called eagerly (NumPyro's MCMC initialisation runs the model outside ``jit``; so do
        ``Predictive`` and a user's own call), the inner solve would otherwise dispatch op by
        op, compiling each small operation on its own (the logistic zoo model: 299 compiles,
        12.5 s for one eager call). Under an outer trace, the jaxpr is traced once per data
        signature and reused by every evaluation of the step: an optimiser's line search
        (``optax.lbfgs`` calls ``value_fn`` in its loops: MetaEB's L-BFGS chunk, linear model,
        J = 1000, lowered to 337k instead of 815k characters of StableHLO), NUTS's several
        traces of its potential. One level of nesting only: a second ``jit`` around it (the
        whole MetaEB objective) made tracing the first step 1.6× slower. Non-array arguments
        of the model (e.g. a Python int) stay static: after ``validate.task_data`` they are
        ``None``, bools and numbers, all hashable, so they key the cache.
        """
        support_arrays, support_rest = _arrays_and_rest(support)
        query_arrays, query_rest = _arrays_and_rest(query)
        key = (context.spec, support_rest, query_rest)
        core = self._cores.get(key)
        if core is None:
            core = self._cores[key] = jax.jit(functools.partial(
                self._core, context.spec, dict(support_rest),
                None if query_rest is None else dict(query_rest)))
        return core(context.globals_, context.indices, context.phi0, support_arrays,
                    query_arrays)

    def _core(self, spec: TaskSpec, support_rest, query_rest, globals_, indices, phi0,
              support, query):
        """What :meth:`_solve_and_score` compiles: the context rebuilt from its arrays (the
        transforms are only needed to emit φ̂, outside), the solve and the objective."""
        context = TaskContext(spec, globals_, indices, phi0, transforms={})
        support = {**support, **support_rest}
        query = None if query_rest is None else {**query, **query_rest}
        phi_hat, info = self.solve(context, support)
        value, min_eigenvalue = self.task_objective(context, phi_hat, support, query)
        return phi_hat, value, info, min_eigenvalue

    def _emit(self, context: TaskContext, phi_hat, value, info: InnerInfo,
              min_eigenvalue) -> None:
        spec = context.spec
        # The same plate as the model's, with the same subsample indices (given through the
        # plate's own message, NumPyro's public route), so the factor is scaled and indexed
        # like the model's task sites.
        subsample_size = None if spec.size == spec.subsample_size else spec.subsample_size
        with handlers.substitute(data={spec.plate_name: context.indices}):
            plate = tasks(spec.size, spec.plate_name, subsample_size=subsample_size,
                          dim=spec.plate_dim)
        trailing = (1,) * (-spec.plate_dim - 1)
        with plate:
            numpyro.factor(OBJECTIVE_SITE, value.reshape(value.shape + trailing))
        for name, site_value in context.constrained(phi_hat).items():
            numpyro.deterministic(name, site_value)
        numpyro.deterministic(sites.INNER_CONVERGED, info.converged)
        numpyro.deterministic(sites.INNER_DIVERGED, info.diverged)
        numpyro.deterministic(sites.INNER_GRAD_NORM, info.grad_norm)
        numpyro.deterministic(sites.INNER_NUM_STEPS, info.num_steps)
        numpyro.deterministic(sites.INNER_LOSS, info.loss)
        numpyro.deterministic(sites.INNER_FINAL_LOSS, info.final_loss)
        if min_eigenvalue is not None:
            numpyro.deterministic(sites.CURVATURE_MIN_EIGENVALUE, min_eigenvalue)

    # -- eager checks ---------------------------------------------------------------------
    def check(self, support: Mapping[str, Any], query: Mapping[str, Any] | None = None,
              *, rng_key: jnp.ndarray | None = None, params: Mapping[str, Any] | None = None,
              params_name: str = "params") -> TaskSpec:
        """Validate the data and check that tasks are conditionally independent.

        Runs eagerly on concrete data, before anything is traced: the data dicts
        (:func:`~numpyro_hbmeta.validate.task_data`), their shapes against the model, finite
        observations wherever they are not masked, and the independence of the tasks (probed
        at ``params``, with every task at E[φ_j | θ]). The probe is cached: data of the same
        structure, shapes and dtypes are not probed again. ``marginal(...)`` calls it on its
        first concrete call (e.g. under NUTS); drivers call it before fitting.

        Args:
            support: the model's keyword arguments for the support set, task-major.
            query: the same for the query set, or ``None``.
            rng_key: for the random probe direction and for the globals not in ``params``.
            params: constrained values of global sites at which to probe (e.g. the user's
                ``init_params`` or the current fit); missing ones start like NumPyro's
                ``init_to_uniform`` (uniform in (−2, 2) unconstrained, as MetaEB and NUTS).
            params_name: the name of ``params`` in messages (``"init_params"`` for a driver).

        Returns:
            The model's :class:`~numpyro_hbmeta.marginal.spec.TaskSpec` on ``support``.
        """
        support = validate.task_data(support, "support")
        query = None if query is None else validate.task_data(query, "query")
        spec = self.structure(support, query)
        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        key_globals, key_support, key_query = jax.random.split(rng_key, 3)
        start = _start_values(spec, params, params_name)
        with numpyro.validation_enabled(False), handlers.block():
            with handlers.substitute(substitute_fn=start), handlers.seed(rng_seed=key_globals):
                support_trace = trace_hidden(self.model, support)
            context = context_from_trace(support_trace)
            validate.finite_observations(support_trace, support, "support",
                                         task_dim=spec.plate_dim)
            if query is not None:
                with handlers.substitute(data=context.globals_), \
                        handlers.seed(rng_seed=key_globals):
                    query_trace = trace_hidden(self.model, query)
                validate.finite_observations(query_trace, query, "query",
                                             task_dim=spec.plate_dim)
            signature = data_signature(support, query)
            if signature not in self._independent:
                self._check_independence(context, support, query, (key_support, key_query))
                self._independent.add(signature)
        return context.spec

    def _check_implicitly(self, support, query) -> None:
        # The sampler's own start search may still find a finite point: warn, do not stop it.
        try:
            self.check(support, query)
        except ProbePointError as err:
            warnings.warn(f"meta_marginal could not check that tasks are independent: {err}",
                          stacklevel=3)
            self._independent.add(data_signature(support, query))

    def _check_independence(self, context: TaskContext, support, query, keys) -> None:
        where = "θ = {" + ", ".join(f"{name}: {_short(value)}" for name, value in
                                    context.globals_.items()) + "}, φ = E[φ | θ]"
        for data, key in zip((support, query), keys, strict=True):
            if data is not None:
                probe = probe_task_independence(self.model, context.spec, context.globals_,
                                                context.indices, data, context.phi0, key)
                check_task_independence(probe, where=where)


def _start_values(spec: TaskSpec, params: Mapping[str, Any] | None, params_name: str
                  ) -> Callable:
    """A ``substitute_fn`` giving each global site its value in ``params`` (checked against
    the site's shape and support) or NumPyro's ``init_to_uniform`` draw."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.global_sites))
    if unknown:
        raise validate.InputError(f"{params_name} has {unknown}, which are not global sites of "
                                  f"the model (global sites: {list(spec.global_sites)})")
    values = {}
    for name, value in params.items():
        try:
            value = jnp.asarray(value)
        except TypeError as err:
            raise TypeError(f"{params_name}[{name!r}] must be a number or an array, got "
                            f"{value!r} ({type(value).__name__})") from err
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            value = value.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
        values[name] = value

    def substitute_fn(msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        name = msg["name"]
        if name not in values:
            return init_to_uniform(msg)
        value, fn = values[name], msg["fn"]
        expected = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        if value.shape != expected:
            raise validate.InputError(f"{params_name}[{name!r}] has shape {value.shape}, but "
                                      f"global site {name!r} has shape {expected}")
        if not bool(jnp.all(fn.support(value))):
            raise validate.InputError(
                f"{params_name}[{name!r}] = {_short(value)} is outside the support of global "
                f"site {name!r} ({fn.support}); pass a constrained value")
        return value

    return substitute_fn


def data_signature(*data) -> tuple:
    """Tree structure, shapes and dtypes of the data (values of non-array arguments): what
    a cache of per-shape work (the model check, the driver's task structure) is keyed on."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    out = []
    for leaf in leaves:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out.append((tuple(leaf.shape), str(leaf.dtype)))
        else:
            try:
                hash(leaf)
                out.append(leaf)
            except TypeError:
                out.append((type(leaf).__name__, id(leaf)))
    return treedef, tuple(out)


def _short(value) -> str:
    array = np.asarray(value)
    text = np.array2string(array.ravel()[:6] if array.size > 6 else array, precision=4,
                           separator=", ")
    return text if array.size <= 6 else f"{text[:-1]}, ...] (shape {array.shape})"


def meta_marginal(model: Callable, *, inner: TruncatedGD | Newton, objective: str = "laplace",
                  curvature: Any = "full", eta: float = 1e-6) -> MetaMarginal:
    """The meta-inference handler: ``model`` with its tasks marginalised.

    Args:
        model: a NumPyro model with a :class:`~numpyro_hbmeta.tasks` plate; its keyword
            arguments are the data, task-major.
        inner: the task solver, :class:`TruncatedGD` or :class:`Newton`.
        objective: ``"maml"``, ``"llama"`` or ``"laplace"`` (module docstring).
        curvature: ``"full"``, ``"diag"``, ``"kfac"`` or ``"ggn"`` (the last two: ``llama``
            only, Fisher of the query log-likelihood; ``"kfac"`` needs every task parameter
            in a :func:`~numpyro_hbmeta.nn.layers.dense_layer`), or a configured builder such
            as ``KFAC(damping=1e-2)`` (:mod:`numpyro_hbmeta.curvature`); used by ``llama``
            and ``laplace`` only.
        eta: LLAMA's weight η on log det Ĥ_j (1e-6 in the paper).

    Returns:
        ``marginal(support, query=None)``, a NumPyro model whose latent sites are the model's
        global sites; ``MCMC(NUTS(marginal))`` is full Bayes over θ with tasks marginalised,
        its MAP/type-II ML is MAML / LLAMA / Laplace empirical Bayes.

    Examples:
        >>> import jax, numpyro_hbmeta as hbm
        >>> from numpyro_hbmeta.models import linear
        >>> data = linear.load_data(jax.random.PRNGKey(0), small=True)
        >>> marginal = hbm.meta_marginal(linear.model, inner=hbm.Newton())
        >>> from numpyro.infer.util import log_density
        >>> params = {"theta": jax.numpy.array([1.0, -0.5]), "tau": 0.7, "sigma": 0.5}
        >>> lp, _ = log_density(marginal, (data.all_data(),), {}, params)
        >>> bool(jax.numpy.isfinite(lp))
        True
    """
    return MetaMarginal(model, inner=inner, objective=objective, curvature=curvature, eta=eta)

r"""A task's observation model at Φ: what the Fisher-type curvatures (K-FAC, GGN) need.

The ``"kfac"`` and ``"ggn"`` curvatures of :func:`numpyro_hbmeta.meta_marginal` approximate the
curvature of a task's negative log-likelihood by its Fisher / generalised Gauss–Newton matrix
(Martens 2020, §9), Σ_n J_nᵀ Λ_n J_n, with J_n the Jacobian of point n's output (the Normal
mean, the Bernoulli logit) w.r.t. φ_j and Λ_n the output Fisher (1/σ² for a Normal). Both are
read off the user's model by re-running it with the task parameters substituted, as
:mod:`numpyro_hbmeta.marginal.density` does for the log densities:

* :meth:`TaskObservations.whitened_jacobian` gives Λ^½ J per task, (tasks, n, d), from n
  batched vector-Jacobian products (n observed values per task): the exact GGN.
* :meth:`TaskObservations.kfac_statistics` gives the statistics of one Kronecker factor A ⊗ G per
  :func:`~numpyro_hbmeta.nn.layers.dense_layer` whose weights are task parameters (Martens &
  Grosse 2015, §3; Grant et al., ICLR 2018, §4), together with the permutation between the
  columns of Φ and K-FAC's row-major vec(W̄), W̄ = [W; b] (:mod:`numpyro_hbmeta.curvature.kronecker`).

**Targets.** G needs per-point output gradients at targets *sampled from the model's
predictive*, not the observed ones (the empirical Fisher is not a curvature; Kunstner et al.
2019). Normal observations use ỹ = μ + σ r with Rademacher r = ±1: the output gradient is
g = −r/σ, so g gᵀ has the exact expectation 1/σ² on its diagonal with no sampling noise, and
with one output per point (regression) K-FAC's G is the exact expectation. Bernoulli labels
are ỹ = [u < p], categorical ones come from Gumbel-max, anything else from ``fn.sample``. The
random numbers come from a fixed key folded with each task's index in the tasks plate, so the
objective is a deterministic function of the globals, and a task gets the same targets
whatever minibatch it is in (except for the ``fn.sample`` fallback, which draws per site).

**Which parameters a layer holds.** At trace time the model is run twice with Φ replaced by
integer codes (column k holds k + 1, then k + 1 + shift): a weight entry that moves by exactly
the shift *is* the task parameter whose code it carries; one that does not move is a
constant; anything else (a scaled or transformed parameter, e.g. a non-centred
w = θ + τ z) is not supported by K-FAC and raises. Every task parameter must sit in exactly
one declared layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from numpyro_hbmeta.curvature import LayerPoints
from numpyro_hbmeta.marginal.rerun import rerun, task_scale, unwrap_mask
from numpyro_hbmeta.marginal.spec import TaskSpec
from numpyro_hbmeta.nn.layers import layer_offsets

__all__ = ["LayerColumns", "TaskObservations"]


class LayerColumns(NamedTuple):
    """Where a declared layer's task parameters sit in Φ.

    Attributes:
        name: the layer's name.
        rows: rows of W̄ = [W; b] (d_in + 1, d_out) that are task parameters: 0..d_in−1 for
            W, d_in for b.
        d_in: input width.
        d_out: output width.
        columns: (len(rows)·d_out,) the column of Φ holding each entry of the row-major
            vec of W̄[rows], K-FAC's order.
        output_shape: shape of the layer's pre-activation, (tasks, ..., d_out).
    """

    name: str
    rows: tuple[int, ...]
    d_in: int
    d_out: int
    columns: np.ndarray
    output_shape: tuple[int, ...]


class TaskObservations(NamedTuple):
    """The model's observation sites on ``data`` at fixed globals, as functions of Φ.

    Attributes:
        model: the user's model.
        spec: its task structure.
        globals_: constrained global values.
        indices: subsample indices of the tasks plate.
        data: the model's keyword arguments (support or query).
    """

    model: Callable
    spec: TaskSpec
    globals_: Mapping[str, jnp.ndarray]
    indices: Any
    data: Mapping[str, Any]

    # -- re-running the model ---------------------------------------------------------------
    def _run(self, phi: Any, *, targets: Callable | None = None,
             offsets: Mapping[str, Any] | None = None):
        """Trace the model at Φ = ``phi``, hidden from outer handlers; observed values are
        replaced by ``targets(msg)`` when given, layer offsets by ``offsets``."""
        layers = layer_offsets(offsets=offsets)
        tr, _ = rerun(self.model, self.spec, self.globals_, self.indices, self.data, phi,
                      targets=targets, handlers_=(layers,))
        return tr, layers.messages

    def _task_axis(self, site: Mapping[str, Any]) -> int:
        batch_ndim = len(site["fn"].batch_shape)
        if batch_ndim < -self.spec.plate_dim:
            raise ValueError(f"observed site {site['name']!r}: batch shape "
                             f"{tuple(site['fn'].batch_shape)} has no task axis at dim "
                             f"{self.spec.plate_dim}")
        return batch_ndim + self.spec.plate_dim

    # -- the exact GGN -----------------------------------------------------------------------
    def whitened_jacobian(self, phi: jnp.ndarray) -> jnp.ndarray:
        """Λ^½ J per task, (tasks, n, d): J the Jacobian of the n observed outputs (Normal
        means, Bernoulli logits) w.r.t. φ_j, Λ their output Fisher, so that the GGN of the
        negative log-likelihood is (Λ^½ J)ᵀ(Λ^½ J). Masked values have Λ = 0."""

        def outputs(phi):
            tr, _ = self._run(phi)
            values, roots = [], []
            for name in self.spec.observed_sites:
                site = tr[name]
                value, root = _natural_output(site["fn"], name)
                root = root * jnp.sqrt(task_scale(site, self.spec))
                axis = self._task_axis(site)
                values.append(_per_task_flat(value, axis))
                roots.append(_per_task_flat(jnp.broadcast_to(root, value.shape), axis))
            return jnp.concatenate(values, -1), jnp.concatenate(roots, -1)

        values, pullback, roots = jax.vjp(outputs, phi, has_aux=True)
        num_tasks, n = values.shape
        basis = np.broadcast_to(np.eye(n, dtype=values.dtype)[:, None, :], (n, num_tasks, n))
        (rows,) = jax.vmap(pullback)(basis)  # [k, j] = ∂ output_jk / ∂φ_j
        return jnp.swapaxes(rows, 0, 1) * roots[..., None]

    # -- K-FAC -------------------------------------------------------------------------------
    def layer_columns(self, dtype) -> tuple[LayerColumns, ...]:
        """The static map from each declared layer's task parameters to columns of Φ.

        Raises:
            ValueError: a layer's weights are a transformed function of task parameters,
                two layers share a name or a parameter, or a task site is in no layer.
        """
        d, num_tasks = self.spec.dim, self.spec.subsample_size
        if 2 * d + 2 >= 2 ** (np.finfo(dtype).nmant + 1):
            raise ValueError(f"curvature='kfac': {d} task parameters are too many to code "
                             f"exactly in {np.dtype(dtype).name}; run in float64")
        codes = np.broadcast_to(np.arange(1, d + 1, dtype=dtype), (num_tasks, d))
        shift = float(d + 1)
        with jax.ensure_compile_time_eval():
            _, first = self._run(codes)
            _, second = self._run(codes + np.asarray(shift, dtype))
        names = [m["name"] for m in first]
        if len(set(names)) != len(names):
            raise ValueError(f"dense_layer names must be unique, got {names}")
        layers = []
        for m1, m2 in zip(first, second, strict=True):
            layer = _layer_columns(m1, m2, shift, d)
            if layer is not None:
                layers.append(layer)
        self._check_coverage(layers, names)
        return tuple(layers)

    def _check_coverage(self, layers: list[LayerColumns], names: list[str]) -> None:
        counts = np.zeros(self.spec.dim, int)
        owner: dict[int, str] = {}
        for layer in layers:
            for column in layer.columns.tolist():
                if counts[column]:
                    raise ValueError(f"task parameter column {column} is used by two dense "
                                     f"layers ({owner[column]!r} and {layer.name!r}); K-FAC "
                                     "needs each parameter in exactly one layer")
                counts[column] += 1
                owner[column] = layer.name
        for site in self.spec.task_sites:
            missing = int(np.sum(counts[site.offset:site.offset + site.size] == 0))
            if missing:
                hint = (f" (declared layers: {names}; w and b must be task site values "
                        "themselves, sliced or reshaped, not scaled or transformed)"
                        if names else " (the model declares no hbm dense_layer)")
                raise ValueError(
                    f"curvature='kfac' needs every task site in a declared dense layer; site "
                    f"{site.name!r} is not ({missing} of its {site.size} values per task are "
                    f"in no layer){hint}")

    def kfac_statistics(self, phi: jnp.ndarray, rng_key: jax.Array
                        ) -> tuple[tuple[LayerPoints, ...], np.ndarray]:
        """Per-point K-FAC statistics of every task-parameter layer, and the order.

        Returns:
            ``(layers, order)``: one :class:`~numpyro_hbmeta.curvature.LayerPoints` per layer
            with ā restricted to the rows of W̄ that are task parameters, and ``order`` (d,)
            with order[i] the column of Φ at position i of the concatenated K-FAC vec.
        """
        layers = self.layer_columns(phi.dtype)
        targets = self._targets(rng_key)

        def log_lik(offsets):
            tr, messages = self._run(phi, targets=targets, offsets=offsets)
            total = 0.0
            for name in self.spec.observed_sites:
                site = tr[name]
                # √scale: the per-point gradient then carries scale in g gᵀ, as the
                # curvature of scale · log p does.
                root = jnp.sqrt(task_scale(site, self.spec))
                log_prob = site["fn"].log_prob(site["value"]) * root
                total = total + jnp.sum(log_prob)
            return total, {m["name"]: m["args"][0] for m in messages}

        zeros = {layer.name: jnp.zeros(layer.output_shape, phi.dtype) for layer in layers}
        value, pullback, inputs = jax.vjp(log_lik, zeros, has_aux=True)
        (grads,) = pullback(jnp.ones_like(value))
        points = []
        for layer in layers:
            a = inputs[layer.name]
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            a_bar = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)
            if len(layer.rows) < layer.d_in + 1:  # only some rows of W̄ are task parameters
                a_bar = a_bar[..., np.asarray(layer.rows)]
            g = grads[layer.name].reshape(a.shape[0], -1, layer.d_out)
            points.append(LayerPoints(a_bar, g))
        order = np.concatenate([layer.columns for layer in layers])
        return tuple(points), order

    def _targets(self, rng_key: jax.Array) -> Callable:
        """Observed site message -> targets sampled from its distribution (no gradient)."""
        task_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_key, jnp.asarray(self.indices))
        sites = self.spec.observed_sites

        def targets(msg):
            site_keys = jax.vmap(jax.random.fold_in, (0, None))(task_keys,
                                                               sites.index(msg["name"]))
            fn = msg["fn"]
            draw = _sample_target(fn, site_keys, self._task_axis(msg),
                                  jax.random.fold_in(rng_key, sites.index(msg["name"])))
            return jax.lax.stop_gradient(draw.astype(jnp.result_type(msg["value"])))

        return targets


# ------------------------------------------------------------------------------ helpers


def _per_task_flat(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    x = jnp.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0], -1)


def _natural_output(fn, name: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(output, √Λ) broadcast to ``fn.shape()``: Normal → (mean, 1/σ); Bernoulli → (logit,
    √(p(1−p)))."""
    shape = fn.shape()
    base, mask = unwrap_mask(fn)
    if isinstance(base, dist.Normal):
        output, root = base.loc, 1.0 / base.scale
    elif isinstance(base, dist.BernoulliLogits | dist.BernoulliProbs):
        output = base.logits
        p = jax.nn.sigmoid(output)
        root = jnp.sqrt(p * (1.0 - p))
    else:
        raise ValueError(f"curvature='ggn' supports Normal and Bernoulli observation sites; "
                         f"site {name!r} is {type(base).__name__}")
    output = jnp.broadcast_to(output, shape)
    root = jnp.broadcast_to(root, shape)
    if mask is not True:
        root = root * mask.astype(root.dtype)
    return output, root


def _per_task_draws(keys: jax.Array, sampler: Callable, shape: tuple[int, ...],
                    axis: int) -> jnp.ndarray:
    """Draws of ``shape`` whose slice along the task ``axis`` j comes from ``keys[j]``."""
    rest = shape[:axis] + shape[axis + 1:]
    draws = jax.vmap(lambda key: sampler(key, rest))(keys)
    return jnp.moveaxis(draws, 0, axis)


def _sample_target(fn, keys: jax.Array, axis: int, site_key: jax.Array) -> jnp.ndarray:
    shape = fn.shape()
    base, _ = unwrap_mask(fn)
    dtype = jnp.result_type(float)
    if isinstance(base, dist.Normal):
        r = _per_task_draws(keys, lambda k, s: jax.random.rademacher(k, s, dtype), shape, axis)
        return jnp.broadcast_to(base.loc, shape) + jnp.broadcast_to(base.scale, shape) * r
    if isinstance(base, dist.BernoulliLogits | dist.BernoulliProbs):
        u = _per_task_draws(keys, lambda k, s: jax.random.uniform(k, s, dtype), shape, axis)
        return (u < jnp.broadcast_to(base.probs, shape)).astype(dtype)
    if isinstance(base, dist.CategoricalLogits | dist.CategoricalProbs):
        logits = jnp.broadcast_to(base.logits, shape + base.logits.shape[-1:])
        gumbel = _per_task_draws(keys, lambda k, s: jax.random.gumbel(k, s, logits.dtype),
                                 logits.shape, axis)
        return jnp.argmax(logits + gumbel, -1)
    return fn.sample(site_key)


def _codes(value1, value2, shift: float, d: int, what: str) -> np.ndarray | None:
    """Columns of Φ (0-based) an array carries in the two coded runs, or None if it holds
    no task parameter."""
    if value1 is None or isinstance(value1, jax.core.Tracer) \
            or isinstance(value2, jax.core.Tracer):
        return None  # depends on globals or data: not (only) task parameters
    v1, v2 = np.asarray(value1, np.float64), np.asarray(value2, np.float64)
    moved = v2 - v1 == shift
    if not moved.any():
        if np.array_equal(v1, v2):
            return None  # a constant
    elif moved.all():
        codes = v1 - 1.0
        if np.all(codes == np.round(codes)) and codes.min() >= 0 and codes.max() < d:
            return codes.astype(np.int64)
    raise ValueError(f"{what} is a transformed function of task parameters (or mixes them with "
                     "other values); K-FAC needs the task site values themselves, sliced or "
                     "reshaped, not scaled or transformed (scale the layer's input instead)")


def _layer_columns(m1, m2, shift: float, d: int) -> LayerColumns | None:
    name = m1["name"]
    if m2["name"] != name:
        raise ValueError(f"the model's dense layers changed between two runs ({name!r} vs "
                         f"{m2['name']!r}); their structure must not depend on values")
    (_, w, b), (_, w2, b2) = m1["args"], m2["args"]
    w_codes = _codes(w, w2, shift, d, f"dense_layer {name!r}: w")
    b_codes = _codes(b, b2, shift, d, f"dense_layer {name!r}: b")
    if w_codes is None and b_codes is None:
        return None
    d_in, d_out = jnp.shape(w)[-2:]
    if jnp.ndim(w) != 3:
        raise ValueError(f"dense_layer {name!r}: task-parameter weights must be task-batched "
                         f"(tasks, d_in, d_out), got {jnp.shape(w)}")
    rows, blocks = [], []
    for codes, layer_rows in ((w_codes, range(d_in)), (b_codes, [d_in])):
        if codes is None:
            continue
        per_task = codes.reshape(codes.shape[0], -1)
        if not np.all(per_task == per_task[:1]):
            raise ValueError(f"dense_layer {name!r}: tasks take their weights from different "
                             "positions of their parameters; every task must use the same layout")
        rows += list(layer_rows)
        blocks.append(per_task[0].reshape(len(layer_rows), d_out))
    columns = np.concatenate(blocks, 0).reshape(-1)
    return LayerColumns(name, tuple(rows), int(d_in), int(d_out), columns,
                        tuple(jnp.shape(m1["value"])))

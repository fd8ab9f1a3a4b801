"""``dense_layer``: a dense layer a NumPyro model declares, so K-FAC can see its structure.

K-FAC (Martens & Grosse 2015, §3; LLAMA, Grant et al., ICLR 2018, §4) needs, per dense layer
and per point, the layer's input a_n and the gradient g_n of the (sampled-target) loss w.r.t.
the layer's pre-activation. A model written with plain ``x @ w + b`` hides both; a model that
writes ``dense_layer(name, x, w, b)`` computes the same thing and, under a NumPyro handler,
also sends a message of type :data:`LAYER` carrying ``(x, w, b)``. The message's value is an
additive offset on the pre-activation, zeros unless a handler substitutes it, so

    s = x w + b + o,    ∂ loss/∂o_n = ∂ loss/∂s_n = g_n,

the trick :func:`numpyro_hbmeta.nn.mlp_trace` uses (offsets), here through the effect stack.

Why a message type of its own rather than a ``deterministic`` or ``sample`` site: NumPyro's
handlers act on the types they know and pass every other one through untouched
(``substitute``, ``seed``, ``plate``, ``mask``, ``scale``, ``condition``, ``block`` all return
early; ``trace`` records it by name; ``default_process_message`` calls ``fn``, which returns
the zero offset). Samplers, SVI and ``Predictive`` only read ``sample`` and ``deterministic``
sites, so a model using ``dense_layer`` runs under them unchanged, and no layer activations
are stored with posterior draws. With no handler active the message is skipped altogether,
as ``numpyro.deterministic`` does.

Conventions: data are task-major, so a layer whose weights are task parameters takes
``x: (tasks, ..., d_in)``, ``w: (tasks, d_in, d_out)``, ``b: (tasks, d_out)`` and returns
``(tasks, ..., d_out)``; a layer with shared (global) weights takes ``w: (d_in, d_out)``,
``b: (d_out,)``. Call it on the task-batched arrays, not inside ``jax.vmap`` over tasks: a
handler's offset must have a task axis to give per-task gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

__all__ = ["LAYER", "dense_layer", "layer_offsets"]

LAYER = "hbm_dense_layer"
"""The message type of :func:`dense_layer`."""


def _affine(name: str, x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None) -> jnp.ndarray:
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim == 2:  # shared weights: a plain dense layer
        if x.shape[-1] != w.shape[0]:
            raise ValueError(f"dense_layer {name!r}: inputs (..., {w.shape[0]}) expected for "
                             f"weights {w.shape}, got {x.shape}")
        y = x @ w
        return y if b is None else y + b
    if w.ndim != 3 or x.ndim < 2 or x.shape[0] != w.shape[0] or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"dense_layer {name!r}: expected task-batched weights (tasks, d_in, d_out) with "
            f"inputs (tasks, ..., d_in), got w {w.shape} and x {x.shape} (call it on "
            "task-major arrays, not inside jax.vmap over tasks)")
    y = jnp.einsum("t...i,tio->t...o", x, w)
    if b is None:
        return y
    b = jnp.asarray(b)
    if b.shape != (w.shape[0], w.shape[2]):
        raise ValueError(f"dense_layer {name!r}: expected bias ({w.shape[0]}, {w.shape[2]}) "
                         f"for weights {w.shape}, got {b.shape}")
    return y + b.reshape((b.shape[0],) + (1,) * (y.ndim - 2) + (b.shape[1],))


def dense_layer(name: str, x: jnp.ndarray, w: jnp.ndarray,
                b: jnp.ndarray | None = None) -> jnp.ndarray:
    """A dense layer s = x w + b that a handler can see (K-FAC needs its inputs and outputs).

    Outside any handler it is exactly the affine map; under handlers it sends a
    :data:`LAYER` message whose value, a zero offset by default, is added to s (module
    docstring). ``curvature="kfac"`` in :func:`numpyro_hbmeta.meta_marginal` requires every
    task parameter to be the ``w`` or ``b`` of some ``dense_layer``, as the values of task
    sites themselves (sliced or reshaped, not scaled or otherwise transformed; scale the
    layer's input instead).

    Args:
        name: the layer's name, unique within the model.
        x: inputs, (tasks, ..., d_in) for task-batched weights, (..., d_in) for shared ones.
        w: weights, (tasks, d_in, d_out) or (d_in, d_out).
        b: optional bias, (tasks, d_out) or (d_out,).

    Returns:
        The pre-activation, (tasks, ..., d_out) (or (..., d_out)).

    Examples:
        >>> import jax.numpy as jnp
        >>> x, w, b = jnp.ones((2, 3, 1)), jnp.full((2, 1, 4), 2.0), jnp.zeros((2, 4))
        >>> dense_layer("hidden", x, w, b).shape
        (2, 3, 4)
    """
    y = _affine(name, x, w, b)
    if not _PYRO_STACK:
        return y
    msg = {
        "type": LAYER,
        "name": name,
        "fn": lambda *args, **kwargs: jnp.zeros(y.shape, y.dtype),
        "args": (x, w, b),
        "kwargs": {},
        "value": None,
        "infer": {},
        "cond_indep_stack": [],
    }
    msg = apply_stack(msg)
    return y + msg["value"]


class layer_offsets(Messenger):  # noqa: N801 - a handler, named like numpyro's
    """Collect every :func:`dense_layer` message, in order, and substitute offsets by name.

    Args:
        offsets: layer name -> offset, broadcastable to the layer's pre-activation.

    Attributes:
        messages: the layer messages seen, in model order (duplicated names are kept, so
            callers can report them).
    """

    def __init__(self, fn=None, offsets: Mapping[str, Any] | None = None) -> None:
        self.offsets = dict(offsets or {})
        self.messages: list[dict[str, Any]] = []
        super().__init__(fn)

    def process_message(self, msg) -> None:
        if msg["type"] != LAYER:
            return
        if msg["name"] in self.offsets:
            msg["value"] = self.offsets[msg["name"]]
        self.messages.append(msg)

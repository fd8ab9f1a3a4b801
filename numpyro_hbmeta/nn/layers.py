"""``dense_layer`` and ``conv2d_layer``: layers a NumPyro model declares, so K-FAC can see them.

K-FAC (Martens & Grosse 2015, §3; LLAMA, Grant et al., ICLR 2018, §4) needs, per dense layer
and per point, the layer's input a_n and the gradient g_n of the (sampled-target) loss w.r.t.
the layer's pre-activation. A model written with plain ``x @ w + b`` hides both; a model that
writes ``dense_layer(name, x, w, b)`` computes the same thing and, under a NumPyro handler,
also sends a message of type :data:`LAYER` carrying ``(x, w, b)``. The message's value is an
additive offset on the pre-activation, zeros unless a handler substitutes it, so

    s = x w + b + o,    ∂ loss/∂o_n = ∂ loss/∂s_n = g_n,

the per-point pre-activation gradients whose second moment is K-FAC's G factor (Martens &
Grosse 2015, §3), from one backward pass through the effect stack.

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
handler's offset must have a task axis to give per-task gradients. A convolution is declared
with :func:`conv2d_layer`, a dense layer on image patches (K-FAC's convolution factors, KFC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

from numpyro_hbmeta import sites

__all__ = ["LAYER", "conv2d_layer", "dense_layer", "image_patches", "layer_offsets"]

LAYER = sites.DENSE_LAYER
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


def image_patches(x: jnp.ndarray, kernel: tuple[int, int], *, stride: int | Sequence[int] = 1,
                  padding: str | Sequence[tuple[int, int]] = "SAME") -> jnp.ndarray:
    """The k_h × k_w patches a 2-D convolution reads, one per output location.

    Args:
        x: NHWC images, (..., H, W, c_in); leading axes are kept.
        kernel: (k_h, k_w).
        stride: an int or (s_h, s_w).
        padding: ``"SAME"``, ``"VALID"`` or explicit ((lo, hi), (lo, hi)).

    Returns:
        (..., H', W', c_in · k_h · k_w), features ordered (c_in, k_h, k_w) as
        ``jax.lax.conv_general_dilated_patches`` orders them.
    """
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    batch = x.shape[:-3]
    flat = x.reshape((-1, *x.shape[-3:]))
    patches = jax.lax.conv_general_dilated_patches(
        flat, tuple(kernel), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return patches.reshape((*batch, *patches.shape[1:]))


def conv2d_layer(name: str, x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None, *,
                 stride: int | Sequence[int] = 1,
                 padding: str | Sequence[tuple[int, int]] = "SAME") -> jnp.ndarray:
    """A 2-D convolution a handler can see, as a :func:`dense_layer` on image patches.

    y[.., i, j, o] = Σ_{u,v,c} x[.., s_h i + u, s_w j + v, c] w[u, v, c, o] + b[o], the
    cross-correlation of :func:`numpyro_hbmeta.nn.conv2d`, computed as
    ``dense_layer(name, patches, W, b)`` with the patches of :func:`image_patches` as the
    layer input and W the kernel reordered to (c_in · k_h · k_w, c_out). Every output
    location of every image is then a "point" of the dense layer, so ``curvature="kfac"``
    gets Grosse & Martens' (ICML 2016, "KFC", §3) factors: with T locations per image,

        A = (1/(nT)) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ,    G = Σ_{n,t} g_{n,t} g_{n,t}ᵀ,

    which is their Ω ⊗ Γ under spatially uncorrelated derivatives (SUD): cross-location
    terms Σ_{t≠t'} (ā_t ⊗ g_t)(ā_t' ⊗ g_t')ᵀ of the Fisher are dropped.

    Args:
        name: the layer's name, unique within the model.
        x: images, (tasks, ..., H, W, c_in) for task-batched weights, (..., H, W, c_in) for
            shared ones.
        w: kernel, (tasks, k_h, k_w, c_in, c_out) or (k_h, k_w, c_in, c_out).
        b: optional bias, (tasks, c_out) or (c_out,).
        stride: an int or (s_h, s_w).
        padding: ``"SAME"``, ``"VALID"`` or explicit ((lo, hi), (lo, hi)).

    Returns:
        Feature maps, (tasks, ..., H', W', c_out) (or (..., H', W', c_out)).

    Examples:
        >>> import jax.numpy as jnp
        >>> x, w = jnp.ones((2, 3, 5, 5, 1)), jnp.ones((2, 3, 3, 1, 4))
        >>> conv2d_layer("conv", x, w, padding="VALID").shape
        (2, 3, 3, 3, 4)
    """
    w = jnp.asarray(w)
    if w.ndim not in (4, 5):
        raise ValueError(f"conv2d_layer {name!r}: expected a kernel (k_h, k_w, c_in, c_out) or "
                         f"task-batched (tasks, k_h, k_w, c_in, c_out), got {w.shape}")
    k_h, k_w, c_in, c_out = w.shape[-4:]
    x = jnp.asarray(x)
    if x.ndim < 3 + (w.ndim == 5) or x.shape[-1] != c_in:
        raise ValueError(f"conv2d_layer {name!r}: expected images (..., H, W, {c_in}) for a "
                         f"kernel {w.shape}, got {x.shape}")
    patches = image_patches(x, (k_h, k_w), stride=stride, padding=padding)
    matrix = jnp.moveaxis(w, -2, -4).reshape((*w.shape[:-4], c_in * k_h * k_w, c_out))
    return dense_layer(name, patches, matrix, b)


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

"""Small functional networks whose parameters are pytrees (dicts of arrays).

Every layer is a pure function ``layer(params, x)`` so that a task's parameters φ_j can be a
NumPyro sample site (or the unravelled flat vector of one) and the whole network can be
``jit``-ed, ``vmap``-ed over a task axis of parameters and differentiated to any order.

* :func:`dense`, :func:`mlp` — the 1-40-40-1 sinusoid regressor of MAML (Finn et al. 2017,
  §5.1), also the toy regression of LLAMA (Grant et al., ICLR 2018).
* :func:`conv2d`, :func:`conv4` — MAML's 4-block convolutional classifier for Omniglot and
  MiniImagenet (Finn et al. 2017, §5.2; Vinyals et al. 2016).

Parameter layout: a dense layer is ``{"w": (d_in, d_out), "b": (d_out,)}`` and computes
``x @ w + b``; a convolution is ``{"w": (k_h, k_w, c_in, c_out), "b": (c_out,)}`` (HWIO) on NHWC
images. An MLP is ``{"dense_0": ..., "dense_1": ...}``; the conv net is ``{"conv_0": ...,
"conv_3": ..., "head": ...}``. Initialisation is LeCun-normal, w ~ N(0, 1/fan_in), biases 0.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "conv2d",
    "conv4",
    "dense",
    "init_conv2d",
    "init_conv4",
    "init_dense",
    "init_mlp",
    "max_pool",
    "mlp",
    "mlp_sizes",
    "num_params",
    "param_shapes",
]

Params = dict[str, Any]
Activation = Callable[[jnp.ndarray], jnp.ndarray]


# --------------------------------------------------------------------------- layers


def dense(params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """Affine layer y = x W + b.

    Args:
        params: ``{"w": (d_in, d_out), "b": (d_out,)}``.
        x: inputs, shape (..., d_in).

    Returns:
        Outputs, shape (..., d_out).

    Examples:
        >>> import jax.numpy as jnp
        >>> dense({"w": jnp.ones((2, 1)), "b": jnp.array([0.5])}, jnp.array([1.0, 2.0]))
        Array([3.5], dtype=float32)
    """
    w, b = params["w"], params["b"]
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"dense: expected inputs (..., {w.shape[0]}), got {x.shape}")
    return x @ w + b


def conv2d(params: Params, x: jnp.ndarray, *, stride: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = "SAME") -> jnp.ndarray:
    """2-D cross-correlation plus bias on NHWC images.

    y[n, i, j, o] = Σ_{u, v, c} x[n, s_h i + u, s_w j + v, c] w[u, v, c, o] + b[o]
    (after padding), i.e. ``jax.lax.conv_general_dilated`` with layout (NHWC, HWIO, NHWC).
    Like every deep-learning "convolution" the kernel is not flipped.

    Args:
        params: ``{"w": (k_h, k_w, c_in, c_out)}`` and optionally ``"b": (c_out,)``.
        x: images, shape (..., H, W, c_in); leading axes beyond one batch axis are flattened
            for the convolution and restored.
        stride: an int or (s_h, s_w).
        padding: ``"SAME"``, ``"VALID"`` or explicit ((lo, hi), (lo, hi)).

    Returns:
        Feature maps, shape (..., H', W', c_out).
    """
    w = params["w"]
    if x.ndim < 3 or x.shape[-1] != w.shape[2]:
        raise ValueError(f"conv2d: expected images (..., H, W, {w.shape[2]}), got {x.shape}")
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    batch = x.shape[:-3]
    flat = x.reshape((-1, *x.shape[-3:]))
    y = jax.lax.conv_general_dilated(flat, w, window_strides=strides, padding=padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if "b" in params:
        y = y + params["b"]
    return y.reshape((*batch, *y.shape[1:]))


def max_pool(x: jnp.ndarray, *, window: int = 2, stride: int | None = None) -> jnp.ndarray:
    """Max pooling over the two spatial axes of NHWC images, "VALID" padding (floor size)."""
    stride = window if stride is None else stride
    dims = (1,) * (x.ndim - 3) + (window, window, 1)
    strides = (1,) * (x.ndim - 3) + (stride, stride, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, "VALID")


# --------------------------------------------------------------------------- MLP


def _num_dense(params: Params) -> int:
    count = 0
    while f"dense_{count}" in params:
        count += 1
    if count == 0 or count != len(params):
        raise ValueError("mlp: expected params {'dense_0': ..., 'dense_{L-1}': ...}, "
                         f"got keys {sorted(params)}")
    return count


def mlp(params: Params, x: jnp.ndarray, *, activation: Activation = jax.nn.relu) -> jnp.ndarray:
    """Multi-layer perceptron with a linear output layer.

    Args:
        params: ``{"dense_0": {"w", "b"}, ..., "dense_{L-1}": ...}`` (see :func:`init_mlp`).
        x: inputs, shape (..., d_0).
        activation: hidden non-linearity (default ReLU, as MAML's sinusoid net).

    Returns:
        Outputs, shape (..., d_L).

    Examples:
        >>> import jax
        >>> params = init_mlp(jax.random.PRNGKey(0), (1, 40, 40, 1))
        >>> mlp(params, jax.numpy.zeros((10, 1))).shape
        (10, 1)
    """
    num_layers = _num_dense(params)
    for layer in range(num_layers - 1):
        x = activation(dense(params[f"dense_{layer}"], x))
    return dense(params[f"dense_{num_layers - 1}"], x)


def mlp_sizes(params: Params) -> tuple[int, ...]:
    """Layer widths (d_0, ..., d_L) of an MLP's parameters."""
    num_layers = _num_dense(params)
    sizes = [params["dense_0"]["w"].shape[-2]]
    sizes += [params[f"dense_{layer}"]["w"].shape[-1] for layer in range(num_layers)]
    return tuple(sizes)


# --------------------------------------------------------------------------- conv4


def _conv_block(params: Params, x: jnp.ndarray, *, pool: bool) -> jnp.ndarray:
    y = conv2d(params, x, stride=1 if pool else 2, padding="SAME")
    if "scale" in params:
        y = y * params["scale"] + params["offset"]
    y = jax.nn.relu(y)
    return max_pool(y) if pool else y


def conv4(params: Params, x: jnp.ndarray, *, pool: bool = True) -> jnp.ndarray:
    """MAML's 4-block convolutional classifier (Finn et al. 2017, §5.2; Vinyals et al. 2016).

    Each block is 3×3 conv ("SAME") → [per-channel affine] → ReLU → 2×2 max-pool ("VALID"),
    or, with ``pool=False``, a stride-2 conv instead of the pool (MAML's Omniglot variant);
    then the flattened features go through a dense head to n_way logits. 28×28 inputs give
    1×1 maps (28 → 14 → 7 → 3 → 1), 84×84 give 5×5.

    Batch normalisation is *not* used: MAML normalises with the statistics of the current
    batch, which couples the points of a task, so a task's likelihood would no longer factorise
    over points as the hierarchical model assumes. A block whose parameters contain
    ``"scale"``/``"offset"`` (see ``init_conv4(..., affine=True)``) applies the per-channel
    affine y ↦ scale·y + offset in its place (no statistics, no running averages) and its conv
    has no bias, which would be redundant with the offset.

    Args:
        params: ``{"conv_0".."conv_3": {"w", "b" | "scale", "offset"}, "head": {"w", "b"}}``.
        x: images, shape (..., H, W, c_in).
        pool: max-pool (True) or stride-2 convolutions (False); must match ``init_conv4``.

    Returns:
        Logits, shape (..., n_way).
    """
    batch = x.shape[:-3]
    y = x
    for block in range(4):
        y = _conv_block(params[f"conv_{block}"], y, pool=pool)
    features = y.reshape((*batch, -1))
    return dense(params["head"], features)


# --------------------------------------------------------------------------- initialisation


def _lecun_normals(rng_key: jax.Array, shapes: Sequence[tuple[int, ...]], fans: Sequence[int],
                   dtype) -> list[jnp.ndarray]:
    """Independent N(0, 1/fan_in) arrays of the given shapes, from one flat draw.

    One draw, not one per array: each separate threefry call costs XLA a compile.
    """
    sizes = [math.prod(shape) for shape in shapes]
    draws = jax.random.normal(rng_key, (sum(sizes),), dtype)
    arrays, start = [], 0
    for shape, size, fan_in in zip(shapes, sizes, fans, strict=True):
        arrays.append(draws[start:start + size].reshape(shape)
                      / jnp.sqrt(jnp.asarray(fan_in, dtype)))
        start += size
    return arrays


def init_dense(rng_key: jax.Array, d_in: int, d_out: int, *, dtype=None) -> Params:
    """Dense layer parameters, w ~ N(0, 1/d_in), b = 0 (``dtype`` defaults to JAX's float)."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    (w,) = _lecun_normals(rng_key, [(d_in, d_out)], [d_in], dtype)
    return {"w": w, "b": jnp.zeros((d_out,), dtype)}


def init_mlp(rng_key: jax.Array, sizes: Sequence[int], *, dtype=None) -> Params:
    """MLP parameters for layer widths ``sizes`` = (d_0, d_1, ..., d_L).

    Compiled once per (sizes, dtype), so repeated initialisation is cheap.

    Examples:
        >>> import jax
        >>> param_shapes(init_mlp(jax.random.PRNGKey(0), (1, 40, 40, 1)))["dense_1"]
        {'b': (40,), 'w': (40, 40)}
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"init_mlp: expected at least two positive sizes, got {sizes}")
    return _init_mlp(rng_key, sizes, _float_dtype(dtype))


def _float_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.zeros(()).dtype if dtype is None else dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_mlp(rng_key: jax.Array, sizes: tuple[int, ...], dtype: np.dtype) -> Params:
    shapes = list(itertools.pairwise(sizes))
    weights = _lecun_normals(rng_key, shapes, sizes[:-1], dtype)
    return {f"dense_{layer}": {"w": w, "b": jnp.zeros((w.shape[1],), dtype)}
            for layer, w in enumerate(weights)}


def init_conv2d(rng_key: jax.Array, c_in: int, c_out: int, *, kernel_size: int = 3,
                bias: bool = True, dtype=None) -> Params:
    """Convolution parameters, w ~ N(0, 1/(k² c_in)) in HWIO layout, b = 0."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    shape = (kernel_size, kernel_size, c_in, c_out)
    params = {"w": _lecun_normals(rng_key, [shape], [kernel_size**2 * c_in], dtype)[0]}
    if bias:
        params["b"] = jnp.zeros((c_out,), dtype)
    return params


def _conv4_feature_size(image_size: tuple[int, int], pool: bool) -> tuple[int, int]:
    height, width = image_size
    for _ in range(4):
        # "SAME" conv keeps the size; a 2×2 VALID pool floors, a stride-2 SAME conv ceils.
        height, width = (height // 2, width // 2) if pool else (-(-height // 2), -(-width // 2))
    if height < 1 or width < 1:
        raise ValueError(f"conv4: images of size {image_size} are too small for 4 blocks")
    return height, width


def init_conv4(rng_key: jax.Array, n_way: int, *, image_size: tuple[int, int] = (28, 28),
               channels: int = 1, filters: int = 64, affine: bool = False, pool: bool = True,
               dtype=None) -> Params:
    """Parameters of :func:`conv4` for ``n_way`` classes (compiled once per configuration).

    Args:
        rng_key: PRNG key.
        n_way: number of output logits.
        image_size: (H, W) of the inputs, to size the head.
        channels: input channels (1 for Omniglot, 3 for MiniImagenet).
        filters: feature maps per block (64 in MAML's Omniglot net, 32 for MiniImagenet).
        affine: per-channel scale/offset after each conv in place of batch norm (the conv
            then has no bias); otherwise a conv bias and nothing else.
        pool: max-pool blocks (True) or stride-2 convolutions (False).
        dtype: parameter dtype.
    """
    height, width = _conv4_feature_size((int(image_size[0]), int(image_size[1])), pool)
    return _init_conv4(rng_key, int(n_way), height * width, int(channels), int(filters),
                       bool(affine), _float_dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_conv4(rng_key: jax.Array, n_way: int, feature_pixels: int, channels: int,
                filters: int, affine: bool, dtype: np.dtype) -> Params:
    in_channels = [channels] + [filters] * 3
    shapes = [(3, 3, c_in, filters) for c_in in in_channels] + [(feature_pixels * filters, n_way)]
    fans = [9 * c_in for c_in in in_channels] + [feature_pixels * filters]
    *kernels, head = _lecun_normals(rng_key, shapes, fans, dtype)
    params: Params = {}
    for block, kernel in enumerate(kernels):
        if affine:
            params[f"conv_{block}"] = {"w": kernel, "scale": jnp.ones((filters,), dtype),
                                       "offset": jnp.zeros((filters,), dtype)}
        else:
            params[f"conv_{block}"] = {"w": kernel, "b": jnp.zeros((filters,), dtype)}
    params["head"] = {"w": head, "b": jnp.zeros((n_way,), dtype)}
    return params


# --------------------------------------------------------------------------- utilities


def param_shapes(params: Any) -> Any:
    """The pytree of parameter shapes (works on arrays and on ``jax.eval_shape`` results).

    Examples:
        >>> import jax
        >>> shapes = jax.eval_shape(lambda k: init_mlp(k, (1, 40, 1)), jax.random.PRNGKey(0))
        >>> param_shapes(shapes)["dense_0"]
        {'b': (40,), 'w': (1, 40)}
    """
    return jax.tree.map(lambda leaf: tuple(leaf.shape), params)


def num_params(params: Any) -> int:
    """Total number of scalar parameters (e.g. 1761 for the 1-40-40-1 MLP)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

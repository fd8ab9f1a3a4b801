"""Neural networks for the tasks: functional layers, their model-facing sites, episodes.

* :mod:`.networks` — pure functional networks over pytree parameters (``dense``, ``mlp``,
  ``conv4`` and their initialisers), re-exported here so ``from numpyro_hbmeta import nn;
  nn.mlp(params, x)`` works;
* :mod:`.layers` — :func:`~numpyro_hbmeta.nn.layers.dense_layer` and
  :func:`~numpyro_hbmeta.nn.layers.conv2d_layer`, which declare a layer to K-FAC;
* :mod:`.vec` — K-FAC's row-major vectorisation of layer weights;
* :mod:`.episodes` — N-way K-shot episodes from an image folder (Omniglot).
"""

from numpyro_hbmeta.nn.networks import (
    conv2d,
    conv4,
    dense,
    init_conv2d,
    init_conv4,
    init_dense,
    init_mlp,
    max_pool,
    mlp,
    mlp_sizes,
    num_params,
    param_shapes,
)

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

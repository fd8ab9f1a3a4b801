"""Reference maximisation of closed-form evidences, independent of the library's handler."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def minimise_float64(objective: Callable[[jnp.ndarray], jnp.ndarray], start: np.ndarray, *,
                     gtol: float = 1e-9, jac_tol: float = 1e-5) -> np.ndarray:
    """Minimise ``objective`` (a JAX scalar function of a flat vector) with SciPy's BFGS on
    float64 values and gradients; raise if it stops with a gradient norm above ``jac_tol``."""
    import scipy.optimize

    with jax.enable_x64(True):
        value_and_grad = jax.jit(jax.value_and_grad(objective))

        def fun(z):
            value, grad = value_and_grad(jnp.asarray(z, jnp.float64))
            return float(value), np.asarray(grad, float)

        result = scipy.optimize.minimize(fun, np.asarray(start, float), jac=True,
                                         method="BFGS", options={"gtol": gtol, "maxiter": 1000})
    if not result.success and np.linalg.norm(result.jac) > jac_tol:
        raise RuntimeError(f"reference maximisation did not converge: {result.message}")
    return result.x

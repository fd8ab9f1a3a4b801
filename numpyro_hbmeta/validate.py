"""Validators for what a user passes in: data dicts, counts, optimisers, observations.

No silent wrong answers: bad input gets an error that names the argument or site, what was
expected and what was received, raised eagerly before anything is traced, never a raw error
from deep inside JAX or NumPyro. The drivers (:class:`~numpyro_hbmeta.MetaEB`, the baselines)
and :meth:`~numpyro_hbmeta.MetaMarginal.check` call these; each is small and pure apart from
the error it raises.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "InputError",
    "finite_observations",
    "non_negative_int",
    "optimizer",
    "positive_int",
    "positive_number",
    "task_batch_size",
    "task_data",
]

_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_SHOWN = 5  # positions shown in a message


class InputError(ValueError):
    """A bad value passed by the user, reported by this library (not by JAX or NumPyro).

    Drivers re-raise any other error from a model run with the argument named; these pass
    through unchanged.
    """


# -- data -------------------------------------------------------------------------------------
def task_data(data: Any, what: str) -> dict[str, Any]:
    """Check a support or query dict and return it with its arrays as ``jax.Array``.

    Lists and tuples of numbers and numpy arrays become ``jnp`` arrays; ``None`` and Python or
    numpy scalars pass unchanged (models take sizes and flags). Data are task-major: an array's
    leading axis is the task, the second (if any) the point.

    Args:
        data: the model's keyword arguments, e.g. ``{"x": (tasks, points, features),
            "y": (tasks, points)}``.
        what: the argument's name in messages (``"support"``, ``"query"``, ``"data"``).

    Raises:
        TypeError: ``data`` is not a mapping, or a value is a string, an object, a ragged
            nested list or a non-numeric array.
        InputError: an array holds no tasks (leading axis 0) or no points (second axis 0).

    Examples:
        >>> task_data({"y": [[1.0, 2.0], [3.0, 4.0]], "n": 2}, "support")["y"].shape
        (2, 2)
        >>> task_data({"y": [[1.0], []]}, "support")
        Traceback (most recent call last):
        ...
        TypeError: support['y'] is a ragged nested list ...
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a dict of the model's keyword arguments (task-major "
                        f"arrays), got {_describe(data)}")
    return {key: _task_array(value, f"{what}[{key!r}]") for key, value in data.items()}


def _task_array(value: Any, label: str) -> Any:
    if value is None or isinstance(value, bool | numbers.Number | np.generic):
        return value
    if isinstance(value, str | bytes):
        raise TypeError(f"{label} is the string {value!r}; data must be numeric arrays "
                        "(jax or numpy) or nested lists of numbers")
    if isinstance(value, list | tuple):
        try:
            converted = np.asarray(value)
        except ValueError as err:  # numpy >= 1.24 refuses ragged lists
            raise TypeError(f"{label} is a ragged nested list (rows of different lengths); "
                            "pad it to a (tasks, points, ...) array and mask the padding "
                            "with numpyro.handlers.mask") from err
        if converted.dtype == object:
            raise TypeError(f"{label} is a ragged nested list or holds objects; pass a "
                            "numeric (tasks, points, ...) array")
        value = converted
    if isinstance(value, np.ndarray | jax.Array):
        if np.dtype(value.dtype).kind not in _NUMERIC_KINDS:
            raise TypeError(f"{label} has dtype {value.dtype}; data must be numeric arrays")
        _check_task_points(jnp.shape(value), label)
        return value if isinstance(value, jax.Array) else jnp.asarray(value)
    raise TypeError(f"{label} is {_describe(value)}; data must be numeric arrays (jax or "
                    "numpy), nested lists of numbers, scalars or None")


def _check_task_points(shape: tuple[int, ...], label: str) -> None:
    if len(shape) >= 1 and shape[0] == 0:
        raise InputError(f"{label} holds no tasks: its shape is {tuple(shape)} and the leading "
                         "axis is the task axis; pass at least one task")
    if len(shape) >= 2 and shape[1] == 0:
        raise InputError(f"{label} holds no points: its shape is {tuple(shape)}, (tasks, "
                         "points, ...) with 0 points per task; pass at least one point")


# -- counts and numbers -----------------------------------------------------------------------
def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` ≥ 1; Python and numpy integers only (not bools, not floats).

    Examples:
        >>> positive_int(np.int64(3), "num_steps")
        3
        >>> positive_int(3.0, "num_steps")
        Traceback (most recent call last):
        ...
        TypeError: num_steps must be an integer, got 3.0 (float)
    """
    number = _integer(value, name)
    if number < 1:
        raise InputError(f"{name} must be a positive integer (at least 1), got {number}")
    return number


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` ≥ 0 (e.g. ``num_warmup``); as :func:`positive_int` otherwise."""
    number = _integer(value, name)
    if number < 0:
        raise InputError(f"{name} must be a non-negative integer, got {number}")
    return number


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an integer, got {value!r} (bool)")
    if isinstance(value, float | np.floating):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {_describe(value)}") from None


def positive_number(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a finite ``float`` > 0 (≥ 0 with ``allow_zero``), e.g. a step size."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise InputError(f"{name} must be a finite {bound} number, got {number!r}")
    return number


def task_batch_size(value: Any, num_tasks: int) -> int | None:
    """``None``, or a number of tasks per step in 1..``num_tasks``."""
    if value is None:
        return None
    try:
        size = positive_int(value, "task_batch_size")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (the data hold {num_tasks} tasks)") from None
    if size > num_tasks:
        raise InputError(f"task_batch_size must be at most the number of tasks, {num_tasks}, "
                         f"got {size}")
    return size


# -- optimisers -------------------------------------------------------------------------------
_NUMPYRO_TO_OPTAX = {
    "Adam": "optax.adam(step_size)",
    "ClippedAdam": "optax.chain(optax.clip(clip_norm), optax.adam(step_size))",
    "Adagrad": "optax.adagrad(step_size)",
    "Momentum": "optax.sgd(step_size, momentum=mass)",
    "RMSProp": "optax.rmsprop(step_size)",
    "RMSPropMomentum": "optax.rmsprop(step_size, momentum=momentum)",
    "SGD": "optax.sgd(step_size)",
    "SM3": "optax.sm3(step_size)",
    "Minimize": "optax.lbfgs()",
}


def optimizer(value: Any) -> optax.GradientTransformation:
    """Check that ``value`` is an optax ``GradientTransformation`` (including ones with extra
    arguments, such as ``optax.lbfgs()``) and return it.

    Raises:
        TypeError: a string, a ``numpyro.optim`` object (the message gives its optax
            equivalent), an uncalled optax factory, or anything else.
    """
    if isinstance(value, optax.GradientTransformation):
        return value
    expected = "optimizer must be an optax GradientTransformation, e.g. optax.adam(1e-2)"
    if isinstance(value, str):
        raise TypeError(f"{expected}; got the string {value!r}")
    cls = type(value)
    if cls.__module__.startswith("numpyro.optim"):
        equivalent = _NUMPYRO_TO_OPTAX.get(cls.__name__, "the optax transformation of the "
                                                         "same name")
        raise TypeError(f"{expected}; got numpyro.optim.{cls.__name__}, a NumPyro optimiser. "
                        f"Use its optax equivalent, {equivalent} (numpyro.optim.optax_to_numpyro"
                        " converts the other way, optax to NumPyro)")
    if callable(value) and getattr(value, "__module__", "").startswith("optax"):
        raise TypeError(f"{expected}; got the function {value.__module__.split('.')[0]}."
                        f"{getattr(value, '__name__', value)}, not called: call it with its "
                        "learning rate")
    raise TypeError(f"{expected}; got {_describe(value)}")


# -- observations -----------------------------------------------------------------------------
def finite_observations(trace: Mapping[str, Mapping[str, Any]], data: Mapping[str, Any],
                        what: str, *, task_dim: int) -> None:
    """Raise if the data hold a NaN or inf that reaches the model's log density.

    * An observed site's value must be finite wherever the site's mask is True: masked
      padding of observations may hold anything (the mask zeroes its log density and its
      gradient).
    * Every other floating-point data array (a covariate such as ``x``) must be finite
      everywhere, padding included: a NaN covariate makes the site's parameters NaN, and a
      NaN reaches the gradients through the masked branch of ``jnp.where``.

    Args:
        trace: a concrete trace of the model on ``data``.
        data: the model's keyword arguments (``what``).
        what: the argument's name in messages.
        task_dim: the (negative) batch dim of the tasks plate.

    Raises:
        InputError: naming the data argument, the site, the tasks and the first positions.
    """
    from numpyro_hbmeta.marginal.rerun import site_mask  # rerun imports this module

    observed_arguments = set()
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        key = _argument_of(site, data)
        observed_arguments.add(key)
        value = np.asarray(site["value"])
        if value.dtype.kind not in "fc":
            continue
        event_dim = len(site["fn"].event_shape)
        bad = ~np.isfinite(value)
        if event_dim:
            bad = bad.reshape((*value.shape[:value.ndim - event_dim], -1)).any(-1)
        mask = site_mask(site["fn"])
        if mask is not None:
            bad = np.logical_and(bad, mask)
        if bad.any():
            label = (f"{what}[{key!r}] (observed site {name!r})" if key is not None
                     else f"observed site {name!r} in {what}")
            raise InputError(f"{label} holds NaN or inf at {_positions(bad, task_dim)}; "
                             "observations must be finite: drop those points, or mask them "
                             "(numpyro.handlers.mask) and fill them with a finite value")
    for key, value in data.items():
        if key in observed_arguments or not hasattr(value, "dtype") or not jnp.ndim(value):
            continue
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            where = _positions(~np.isfinite(array), -array.ndim)
            raise InputError(
                f"{what}[{key!r}] holds NaN or inf at {where}"
                f" (shape {array.shape}); inputs other than observations must be finite even "
                "where masked (a NaN reaches the gradients through the mask): fill padding "
                "with a finite value")


def _positions(bad: np.ndarray, task_dim: int) -> str:
    """The first positions of True in ``bad`` as "task j point n", ``task_dim`` its (negative)
    task axis."""
    where = np.argwhere(bad)
    task_axis = (bad.ndim + task_dim) if bad.ndim >= -task_dim else None
    shown = []
    for index in where[:_SHOWN]:
        index = tuple(int(i) for i in index)
        if task_axis is None:
            shown.append(f"index {index}")
        else:
            rest = index[:task_axis] + index[task_axis + 1:]
            place = (f" point {rest[0]}" if len(rest) == 1 else f", index {rest}") if rest else ""
            shown.append(f"task {index[task_axis]}{place}")
    more = f" (first {_SHOWN} of {len(where)})" if len(where) > _SHOWN else ""
    return ", ".join(shown) + more


def _argument_of(site: Mapping[str, Any], data: Mapping[str, Any]) -> str | None:
    for key, value in data.items():
        if value is site["value"]:
            return key
    return site["name"] if site["name"] in data else None


def _describe(value: Any) -> str:
    """``repr (type)`` for a short value, ``a <type>`` for a long one (arrays, lists)."""
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        return f"a {type(value).__name__} object"
    return f"{text} ({type(value).__name__})"

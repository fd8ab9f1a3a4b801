"""The zoo protocol: what a model of :mod:`numpyro_hbmeta.models` declares, typed.

Every zoo module declares one ``ZOO_MODEL = ZooModel(...)``; ``hbmeta compare`` and
:mod:`numpyro_hbmeta.infer.methods` read that object and nothing else (no attribute probing).

Why a frozen dataclass rather than a :class:`typing.Protocol` over modules: a Protocol would
still be satisfied structurally by module attributes, checked only by a type checker, and
optional hooks would still be "is the attribute there?". A dataclass *instance* is a value:
its fields are checked once when the module is imported (:meth:`ZooModel.__post_init__`),
absent hooks are ``None`` rather than missing attributes, it is hashable and immutable
(``dataclasses.replace`` gives a variant, e.g. other fit settings in a test), and tools read
it without importing anything else. The module attributes that tutorials and tests use
(``linear.model``, ``linear.load_data``, ``SUMMARY``...) stay; ``ZOO_MODEL`` points at them.

Fit settings (:class:`FitSettings`) replace the former ``FIT`` dicts merged over
``methods.DEFAULTS``: one frozen dataclass per model with every field typed and defaulted.
MAML's inner step ``maml_step_size=None`` means "chosen from the data" (see
:func:`numpyro_hbmeta.infer.methods.stable_step_size`): β = c / max_j λ_max,j with λ_max,j the
largest eigenvalue of task j's support negative-log-likelihood Hessian with the globals at
unconstrained 0 (locations 0, scales 1; not the random start, whose scales vary 50-fold) and
c = ``maml_step_fraction`` = 0.1, so that β·λ ≤ 0.1 there and stays below 1 while MAML's
learned noise scale shrinks up to √10-fold (the implicit prior exists; Grant et al., ICLR
2018, §3.2). A larger c lets the inner loop nearly reach each task's least-squares fit,
which leaves θ barely identified (β = 1.1 on the linear model gave θ̂₀ = 0.06 against the
exact EB 0.74).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from numpyro_hbmeta.data import TaskData

__all__ = ["SMALL_CAPS", "CompareReport", "FitSettings", "ZooModel"]

#: ``hbmeta compare``'s report hook, ``hook(fits, data, out, *, small)`` with ``out`` the output
#: folder (a :class:`~pathlib.Path`) -> (caption, markdown table, extra report lines), for a
#: model whose table of globals says nothing (network weights).
CompareReport = Callable[..., tuple[str, str, list[str]]]


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """How ``hbmeta compare`` fits a zoo model with each method.

    Attributes:
        maml_steps: K, inner gradient steps of MAML and LLAMA.
        maml_step_size: β of the inner steps; ``None``: chosen from the data,
            β = ``maml_step_fraction`` / max_j λ_max,j with the globals at unconstrained 0.
        maml_step_fraction: c in that rule, 0 < c < 1.
        eb_steps: optimiser steps of MetaEB (MAML, LLAMA, Laplace-EB).
        eb_learning_rate: Adam's learning rate for MetaEB.
        nuts_warmup, nuts_samples, nuts_chains: NUTS (full model and Laplace marginal).
        svi_steps, svi_learning_rate: SVI.
        num_samples: posterior draws of the task sites (EB) and of every site (SVI).
        llama_curvature: LLAMA's curvature (a name or a builder such as ``KFAC(...)``).
        llama_eta: LLAMA's η.
        task_draws: draw the task posterior of EB fits (``False``: globals only).
        posterior_curvature: the curvature of the Laplace task posterior those draws come
            from (a name or a builder, e.g. ``"ggn"``: low rank plus diagonal, never a
            d × d matrix per task); ``None``: the fit's own curvature (``"full"`` for MAML).
    """

    maml_steps: int = 5
    maml_step_size: float | None = None
    maml_step_fraction: float = 0.1
    eb_steps: int = 2000
    eb_learning_rate: float = 0.02
    nuts_warmup: int = 500
    nuts_samples: int = 1000
    nuts_chains: int = 2
    svi_steps: int = 5000
    svi_learning_rate: float = 0.01
    num_samples: int = 1000
    llama_curvature: Any = "full"
    llama_eta: float = 1e-6
    task_draws: bool = True
    posterior_curvature: Any = None

    def __post_init__(self) -> None:
        if not 0.0 < self.maml_step_fraction < 1.0:
            raise ValueError("FitSettings: maml_step_fraction must be in (0, 1) so that "
                             f"β·λ < 1, got {self.maml_step_fraction!r}")
        if self.maml_step_size is not None and not self.maml_step_size > 0:
            raise ValueError(f"FitSettings: maml_step_size must be positive or None, got "
                             f"{self.maml_step_size!r}")
        counts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in _COUNTS}
        bad = {k: v for k, v in counts.items() if not (isinstance(v, int) and v >= 1)}
        if bad:
            raise ValueError(f"FitSettings: counts must be positive integers, got {bad}")

    def shortened(self, caps: Mapping[str, int] | None = None) -> FitSettings:
        """These settings with every count capped by ``caps`` (default :data:`SMALL_CAPS`):
        the ``--small`` run of a model that declares no ``small_fit`` of its own."""
        caps = SMALL_CAPS if caps is None else caps
        return dataclasses.replace(self, **{k: min(v, getattr(self, k)) for k, v in caps.items()})


_COUNTS = ("maml_steps", "eb_steps", "nuts_warmup", "nuts_samples", "nuts_chains", "svi_steps",
           "num_samples")

#: The caps of a ``--small`` run (seconds, not minutes, per method on a laptop CPU).
SMALL_CAPS: Mapping[str, int] = {"eb_steps": 300, "nuts_warmup": 200, "nuts_samples": 200,
                                 "nuts_chains": 1, "svi_steps": 1000, "num_samples": 200}


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One model of the zoo, as ``hbmeta compare`` and the method runners see it.

    Attributes:
        name: the zoo name (``hbmeta compare NAME``).
        summary: one line for ``hbmeta models`` and ``--help``.
        model: the NumPyro model, with a ``tasks`` plate.
        load_data: ``load_data(rng_key=None, *, small=False) -> TaskData``.
        globals: names of the global sites, in table order.
        task_sites: names of the latent task sites.
        laplace_exact: whether the Laplace evidence with a converged inner solver is exact
            (linear-Gaussian tasks).
        default_methods: what ``hbmeta compare NAME`` runs without ``--methods``.
        compare_methods: the methods ``hbmeta compare`` accepts for it; ``None``: all.
        fit: settings of a default run.
        small_fit: settings of a ``--small`` run; ``None``: ``fit.shortened()``.
        init_params: ``rng_key -> constrained globals``, the model's own start for MetaEB
            (LeCun's initialisation for networks); ``None``: MetaEB's uniform start.
        exact_type2_ml: ``all data -> globals`` maximising the closed-form evidence, the
            "exact EB" column; ``None`` when there is none.
        compare_report: replaces the table of globals (see :data:`CompareReport`).
    """

    name: str
    summary: str
    model: Callable[..., None]
    load_data: Callable[..., TaskData]
    globals: tuple[str, ...]
    task_sites: tuple[str, ...]
    laplace_exact: bool
    default_methods: tuple[str, ...]
    compare_methods: tuple[str, ...] | None = None
    fit: FitSettings = FitSettings()
    small_fit: FitSettings | None = None
    init_params: Callable[[Any], dict[str, Any]] | None = None
    exact_type2_ml: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    compare_report: CompareReport | None = None

    def __post_init__(self) -> None:
        for field in ("globals", "task_sites", "default_methods"):
            value = getattr(self, field)
            if not (isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)):
                raise ValueError(f"ZooModel {self.name!r}: {field} must be a non-empty tuple of "
                                 f"names, got {value!r}")
        if self.compare_methods is not None:
            outside = [m for m in self.default_methods if m not in self.compare_methods]
            if outside:
                raise ValueError(f"ZooModel {self.name!r}: default method(s) {outside} are not "
                                 f"among its compare_methods {self.compare_methods}")

    def settings(self, *, small: bool = False) -> FitSettings:
        """The fit settings of a default (or ``small``) run."""
        if not small:
            return self.fit
        return self.fit.shortened() if self.small_fit is None else self.small_fit

    def supports(self, method: str) -> bool:
        """Whether ``hbmeta compare`` runs ``method`` on this model."""
        return self.compare_methods is None or method in self.compare_methods

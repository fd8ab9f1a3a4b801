"""numpyro_hbmeta: gradient-based meta-learning as hierarchical Bayes, in NumPyro.

Grant, Finn, Levine, Darrell and Griffiths (ICLR 2018) showed that MAML is empirical Bayes in
a hierarchical model (global θ, task φ_j ~ p(φ | θ)) with the task posterior replaced by a few
steps of gradient descent, and LLAMA improves it with a Laplace approximation. This package
lets a NumPyro user write that model once and fit it with MAML, LLAMA and Laplace empirical
Bayes, and check them against NUTS on the same model.
"""

from numpyro_hbmeta.curvature import GGN, KFAC
from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.infer.eb import MetaEB
from numpyro_hbmeta.infer.implicit_prior import implicit_prior
from numpyro_hbmeta.infer.posterior import TaskPosterior
from numpyro_hbmeta.infer.results import FitResult
from numpyro_hbmeta.infer.state import MetaEBResult, MetaEBState, StepInfo
from numpyro_hbmeta.inner import InnerInfo, Newton, TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import MetaMarginal, meta_marginal
from numpyro_hbmeta.nn.layers import conv2d_layer, dense_layer
from numpyro_hbmeta.output.compare import compare
from numpyro_hbmeta.output.inference_data import to_inference_data

__version__ = "0.1.0"

__all__ = [
    "GGN",
    "KFAC",
    "FitResult",
    "InnerInfo",
    "MetaEB",
    "MetaEBResult",
    "MetaEBState",
    "MetaMarginal",
    "Newton",
    "StepInfo",
    "TaskData",
    "TaskPosterior",
    "TruncatedGD",
    "baselines",
    "compare",
    "conv2d_layer",
    "dense_layer",
    "implicit_prior",
    "meta_marginal",
    "models",
    "plots",
    "tasks",
    "to_inference_data",
]


# Modules reachable as attributes, imported on first use (plots pulls in matplotlib).
_SUBMODULES = {
    "baselines": "numpyro_hbmeta.infer.baselines",
    "models": "numpyro_hbmeta.models",
    "plots": "numpyro_hbmeta.output.plots",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

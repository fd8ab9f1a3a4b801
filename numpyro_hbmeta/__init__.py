"""numpyro_hbmeta: gradient-based meta-learning as hierarchical Bayes, in NumPyro.

Grant, Finn, Levine, Darrell and Griffiths (ICLR 2018) showed that MAML is empirical Bayes in
a hierarchical model (global θ, task φ_j ~ p(φ | θ)) with the task posterior replaced by a few
steps of gradient descent, and LLAMA improves it with a Laplace approximation. This package
lets a NumPyro user write that model once and fit it with MAML, LLAMA and Laplace empirical
Bayes, and check them against NUTS on the same model.
"""

from numpyro_hbmeta.compare import compare
from numpyro_hbmeta.curvature import GGN, KFAC
from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.eb import MetaEB, MetaEBResult, MetaEBState, StepInfo
from numpyro_hbmeta.handler import MetaMarginal, meta_marginal
from numpyro_hbmeta.implicit_prior import implicit_prior
from numpyro_hbmeta.inference_data import to_inference_data
from numpyro_hbmeta.inner import InnerInfo, Newton, TruncatedGD
from numpyro_hbmeta.layers import conv2d_layer, dense_layer
from numpyro_hbmeta.plate import tasks
from numpyro_hbmeta.posterior import TaskPosterior
from numpyro_hbmeta.results import FitResult

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


def __getattr__(name: str):
    if name in ("plots", "models", "baselines"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Per-task curvature of a loss at the task parameters, and its log det, solve and sample.

For a per-task loss ℓ(Φ) = (ℓ_1(φ_1), ..., ℓ_J(φ_J)) with Φ of shape (tasks, d), the Hessian of
Σ_j ℓ_j is block diagonal, so d batched Hessian-vector products (one per basis vector, applied
to all tasks at once) give every task's d×d block; a (tasks·d)×(tasks·d) matrix is never
formed. The Laplace evidence (Grant et al., ICLR 2018, eq. 4; MacKay 1992) and LLAMA's
penalty η·log det Ĥ_j (ibid. §4) only need ``logdet``; the Laplace task posterior needs
``solve`` and ``sample``.

A curvature that is not positive definite is never replaced: ``logdet`` returns NaN for that
task (so an objective built on it is non-finite and drivers stop and report it) and
``min_eigenvalue`` says which tasks and by how much.

Builders (:data:`CURVATURES`) are called as ``build(loss, phi, observations)``: ``"full"`` and
``"diag"`` differentiate ``loss``; the Fisher-type ``"kfac"`` and ``"ggn"`` ignore it and read
the model's observation sites through ``observations`` (a
:class:`~numpyro_hbmeta.marginal.fisher.TaskObservations` on the data the loss is computed on). They
approximate the curvature of a negative *log-likelihood*, so they serve LLAMA's penalty
η·log det Ĥ_j (the paper's use, Grant et al., ICLR 2018, §4), not the Laplace evidence, which
needs the curvature of the log joint (``likelihood_only``). Their damping δ is a fixed part of
the curvature, independent of η: Ĥ_j = F_j + δI, which keeps log det finite when a task has
fewer points than parameters (F_j singular). Configure it with ``KFAC(damping=...)`` or
``GGN(damping=...)`` passed as ``curvature=``.

One structure per module: :mod:`.full`, :mod:`.diag`, :mod:`.ggn` and :mod:`.kfac` (whose
Kronecker algebra is :mod:`.kronecker`); :mod:`.base` holds the block helpers and
:mod:`.registry` the builders by name. ``_linalg`` is a private workaround for jaxlib's CPU
linear algebra.
"""

from numpyro_hbmeta.curvature.base import (
                                           Observations,
                                           TaskLoss,
                                           hessian_blocks,
                                           jacobian_blocks,
                                           linear_blocks,
)
from numpyro_hbmeta.curvature.diag import DiagCurvature, diag
from numpyro_hbmeta.curvature.full import FullCurvature, full
from numpyro_hbmeta.curvature.ggn import GGN, GGNCurvature
from numpyro_hbmeta.curvature.kfac import KFAC, KFACTaskCurvature, LayerPoints, PermutedCurvature
from numpyro_hbmeta.curvature.registry import CURVATURES, CurvatureBuilder, curvature_builder

__all__ = [
    "CURVATURES",
    "GGN",
    "KFAC",
    "CurvatureBuilder",
    "DiagCurvature",
    "FullCurvature",
    "GGNCurvature",
    "KFACTaskCurvature",
    "LayerPoints",
    "Observations",
    "PermutedCurvature",
    "TaskLoss",
    "curvature_builder",
    "diag",
    "full",
    "hessian_blocks",
    "jacobian_blocks",
    "linear_blocks",
]

"""Names of the sites the library adds to a trace of ``meta_marginal`` (one place for them).

The handler emits the per-task objective as a factor and the inner solver's and curvature's
per-task diagnostics as deterministic sites; drivers, baselines and exporters read them back
by these names. Every name starts with :data:`PREFIX`, which the ArviZ export and the
baselines use to tell diagnostics from model sites.
"""

from __future__ import annotations

__all__ = [
    "CURVATURE_MIN_EIGENVALUE",
    "DENSE_LAYER",
    "INNER_CONVERGED",
    "INNER_DIVERGED",
    "INNER_FINAL_LOSS",
    "INNER_GRAD_NORM",
    "INNER_LOSS",
    "INNER_NUM_STEPS",
    "OBJECTIVE",
    "PREFIX",
]

PREFIX = "hbm_"
OBJECTIVE = "hbm_objective"                              # factor: per-task objective
INNER_CONVERGED = "hbm_inner_converged"                  # (tasks,) bool
INNER_DIVERGED = "hbm_inner_diverged"                    # (tasks,) bool
INNER_GRAD_NORM = "hbm_inner_grad_norm"                  # (tasks,)
INNER_NUM_STEPS = "hbm_inner_num_steps"                  # (tasks,) int
INNER_LOSS = "hbm_inner_loss"                            # (tasks,) inner loss at the start
INNER_FINAL_LOSS = "hbm_inner_final_loss"                # (tasks,) inner loss at the end
CURVATURE_MIN_EIGENVALUE = "hbm_curvature_min_eigenvalue"  # (tasks,)
DENSE_LAYER = "hbm_dense_layer"                          # message type of layers.dense_layer

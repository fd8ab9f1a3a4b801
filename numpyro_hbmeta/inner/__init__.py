"""Inner solvers: each task's φ̂_j from the globals, batched over tasks.

A solver takes a per-task loss ``loss(Φ) -> (tasks,)`` over Φ of shape (tasks, d) (the flat
unconstrained task parameters) and a start Φ⁰, and returns ``(phi_hat, InnerInfo)``.

* :class:`TruncatedGD` is MAML's inner loop (Finn et al. 2017; Grant et al., ICLR 2018, §3.1,
  eq. 3): K steps φ ← φ − β ∇ℓ(φ) from φ⁰ = E[φ | θ]. On the support negative log-likelihood
  (``prior="implicit"``) it is MAML, whose early stopping acts as a Gaussian prior (Santos 1996;
  :func:`numpyro_hbmeta.implicit_prior`); on the negative log joint (``prior="explicit"``) it is
  truncated MAP gradient descent. Gradients flow through the unrolled loop (second order)
  unless ``first_order=True``.
* :class:`Newton` converges to the task MAP of the negative log joint by damped Newton steps
  with a backtracking line search on the task's own loss, and differentiates through the
  optimum by the implicit function theorem (``jax.lax.custom_root``), not by unrolling:
  dφ̂/dθ = −H⁻¹ ∂²ℓ/∂φ∂θ.

Neither hands back a number it cannot vouch for: :class:`InnerInfo` says, per task, whether the
solve converged or diverged, and :func:`max_eigenvalue` / :func:`stable_step_size` give the
curvature a driver needs to name the remedy (a step size below 1/λ_max).

Modules: :mod:`.info` (the report), :mod:`.gd` (:class:`TruncatedGD`, :func:`max_eigenvalue`,
:func:`stable_step_size`) and :mod:`.newton` (:class:`Newton`).
"""

from numpyro_hbmeta.inner.gd import TruncatedGD, max_eigenvalue, stable_step_size
from numpyro_hbmeta.inner.info import InnerInfo
from numpyro_hbmeta.inner.newton import Newton

__all__ = ["InnerInfo", "Newton", "TruncatedGD", "max_eigenvalue", "stable_step_size"]

"""The model layer: what the user's model says, re-run under handlers, and the marginal over θ.

* :mod:`.spec` — which sites are global and which belong to a task (the ``tasks`` plate);
* :mod:`.rerun` — the one primitive that re-runs the model with task values substituted, the
  user's ``scale`` kept and masks unwrapped;
* :mod:`.density` — the per-task log joint and log-likelihood from that re-run;
* :mod:`.fisher` — the observation sites' Jacobians and K-FAC statistics from that re-run;
* :mod:`.meta_marginal` — :class:`~numpyro_hbmeta.marginal.meta_marginal.MetaMarginal`, which
  solves each task's inner problem and returns the marginal of θ (Grant et al., ICLR 2018,
  eq. 2–4).
"""

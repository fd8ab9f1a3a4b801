"""Inference over θ: the empirical-Bayes driver, the task posterior and the baselines.

* :mod:`.eb` — :class:`~numpyro_hbmeta.infer.eb.MetaEB` (``init`` / ``update`` / ``run``), with
  :mod:`.checks` (what it refuses and warns about), :mod:`.task_source`, :mod:`.sharding`,
  :mod:`.persist` and :mod:`.progress`;
* :mod:`.precision` and :mod:`.posterior` — one task posterior for every curvature;
* :mod:`.implicit_prior` — the Gaussian prior that MAML's early stopping implies;
* :mod:`.baselines` — NUTS, SVI and the EB fits as :class:`~numpyro_hbmeta.infer.results.FitResult`;
* :mod:`.methods` — the methods the CLI and :func:`~numpyro_hbmeta.compare` run on a zoo model.
"""

"""Statistics over per-item evaluation results (:mod:`results.stats`) and the published
reference numbers (``results/reference/*.csv``)."""

"""Former home of the report's statistics, frame helpers and figures, now split into stats.py,
frames.py, plot.py and one module per study (analysis/studies/); these names stay importable."""
from __future__ import annotations

from bnlab.analysis.frames import CHANCE, FINAL, split_runs, varying  # noqa: F401
from bnlab.analysis.stats import acc_interval, aggregate, interval, mean_ci, t_quantile  # noqa: F401

"""smoke: does the whole pipeline (sweep -> MLflow -> report) run? Its curves, nothing else."""
from __future__ import annotations

from bnlab.analysis import plot as P
from bnlab.analysis.study import FigureSpec, Study, caption_curves, register

STUDY = register(Study("smoke", figures=[FigureSpec("curves", lambda d: P.fig_curves(
    d.curves, title="Smoke study: the pipeline runs end to end", runs=d.runs), caption_curves)], order=10))

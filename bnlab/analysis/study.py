"""The study as the unit of analysis: `Study(name, prepare, figures, claims)`. `prepare` derives what
the study needs from the runs ONCE; its figures, captions and claims all read that. A registry keyed
by study name; discovery: the built-ins (bnlab/analysis/studies/<name>.py), a study YAML that names
its own analysis module (`analysis: mypkg.mystudy`, importable from the project folder), claims
declared in the YAML (rule kinds below), and a default section for a study with neither.

    claims:                                    # in conf/study/<name>.yaml
      - claim: BN helps LeNet (my source)
        rule: paired_above                     # paired_above | within | above | below
        metric: val/acc                        # a final metric (final/<metric> of each run)
        a: {bn.placement: before_act}          # paired_above: per seed, a - b
        b: {bn.placement: none}
        threshold: 0                           # paired_above (default 0)
      - {claim: ..., rule: within, metric: val/acc, where: {bn.update_stats: true}, reference: 0.85, tolerance: 0.02}
      - {claim: ..., rule: above, metric: train/acc, where: {}, bound: 0.5}
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V


@dataclass
class Claim:
    claim: str  # what the source says, with the source
    measured: str  # what bnlab measured (numbers with n and intervals)
    decision: V.Decision  # holds / refuted / undecided, by the rule it states

    @property
    def agrees(self) -> str:
        return self.decision.text()


class Prepared:
    """What a study derives from its runs, computed once: `runs`, `curves`, `ok` (the usable runs:
    finished, not diverged) and whatever the study's prepare adds (attributes)."""

    def __init__(self, runs: pd.DataFrame, curves: pd.DataFrame, **derived: Any):
        self.runs, self.curves = runs, curves
        self.ok = fr.usable(runs)
        self.__dict__.update(derived)


def prepare_plain(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    return Prepared(runs, curves)


@dataclass
class FigureSpec:
    name: str  # file name (PNG + SVG) in results/<study>/
    make: Callable[[Prepared], Any]  # -> matplotlib Figure
    caption: Callable[[Prepared], str]
    needs: Callable[[Prepared], bool] = lambda d: True  # False: no data for it, skipped


@dataclass
class Study:
    name: str
    prepare: Callable[[pd.DataFrame, pd.DataFrame], Prepared] = prepare_plain
    figures: Sequence[FigureSpec] = ()
    claims: Optional[Callable[[Prepared], List[Claim]]] = None
    order: float = 1000.0  # place of the section in REPORT.md (then by name)
    module: str = ""  # where the analysis comes from (for messages)
    extra_claims: List[Callable[[Prepared], List[Claim]]] = field(default_factory=list)

    def claim_rows(self, d: Prepared) -> Optional[List[Claim]]:
        """Every claim of the study (its own, then the YAML's); None where it has none."""
        fns = ([self.claims] if self.claims else []) + list(self.extra_claims)
        if not fns:
            return None
        return [c for fn in fns for c in fn(d)]


_REGISTRY: Dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add (or replace) a study's analysis under its name; returns it (STUDY = register(Study(...)))."""
    if not study.module:  # the module that registers it (built-in or a user's)
        study.module = str(sys._getframe(1).f_globals.get("__name__", ""))
    _REGISTRY[study.name] = study
    return study


def _load_builtins() -> None:
    from bnlab.analysis import studies

    for m in pkgutil.iter_modules(studies.__path__):
        importlib.import_module(f"{studies.__name__}.{m.name}")


def builtin_studies() -> List[str]:
    """The built-in studies in report order."""
    _load_builtins()
    return [s.name for s in sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))
            if s.module.startswith("bnlab.analysis.studies.")]


# ------------------------------------------------------------------------------ study YAML files

def study_file(name: str) -> Optional[str]:
    """Where the study's YAML is on the config search path (bnlab.studies), or None."""
    from bnlab import studies as files

    src = files.where("study", name)
    return files.describe_source(src, "study", name) if src else None


def yaml_studies() -> List[str]:
    from bnlab import studies as files

    return files.options("study")


def study_question(name: str) -> str:
    """The '# Question:' header of the study's YAML (with its continuation lines), if any."""
    from bnlab import studies as files

    return files.header(name).get("Question", "")


def _yaml(name: str) -> dict:
    from bnlab import studies as files

    text = files.text("study", name)
    if text is None:
        return {}
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    return node if isinstance(node, dict) else {}


def known_studies() -> List[str]:
    """Built-in studies in their order, then every other study YAML of the project and of bnlab."""
    builtins = builtin_studies()
    return builtins + [s for s in yaml_studies() if s not in builtins]


def _import_analysis(target: str, study: str):
    for p in (os.getcwd(), str(_project())):
        if p not in sys.path:
            sys.path.append(p)
    try:
        return importlib.import_module(target)
    except Exception as e:  # ImportError, or an error inside the user's module
        raise ValueError(f"analysis={target!r} of study {study!r} cannot be imported ({type(e).__name__}: {e}); "
                         f"it must be a module importable from the project folder") from e


def _project() -> Path:
    from bnlab.store import project_home

    return project_home()


def get_study(name: str) -> Study:
    """The analysis of study `name`: the module its YAML names (`analysis:`), else the built-in one,
    else the default section; plus the claims its YAML declares (`claims:`)."""
    _load_builtins()
    spec = _yaml(name)
    target = spec.get("analysis")
    study = None
    if target:
        mod = _import_analysis(str(target), name)
        mine = _REGISTRY.get(name)
        study = getattr(mod, "STUDY", None) or (mine if mine is not None and mine.module == mod.__name__ else None)
        if not isinstance(study, Study):
            raise ValueError(f"analysis={target!r} of study {name!r} defines no Study: set STUDY = "
                             f"register(Study({name!r}, ...)) in it")
    study = study or _REGISTRY.get(name) or default_study(name)
    declared = spec.get("claims") or []
    if declared:
        from bnlab.analysis.rules import yaml_claims

        study = Study(study.name, study.prepare, study.figures, study.claims, study.order, study.module,
                      [*study.extra_claims, yaml_claims(declared, name)])
    return study


def evaluate_claims(study_name: str, runs: pd.DataFrame, curves: pd.DataFrame) -> List[Claim]:
    """Every claim of a study over these runs, each with .claim, .measured and .decision (a
    verdicts.Decision); [] where the study has none. The study's prepare runs once."""
    study = get_study(study_name)
    return study.claim_rows(study.prepare(runs, curves)) or []


# ------------------------------------------------------------------------------ claim tables

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claim_table(study: Study, d: Prepared) -> List[str]:
    """Markdown lines of the study's claim table ([] where the study has no claims)."""
    try:
        rows = study.claim_rows(d)
    except Exception as e:  # a claim that cannot be computed is reported, never hidden
        return [f"*Claims could not be computed: `{e}`*", ""]
    if rows is None:
        return []
    if not rows:
        return ["*Claims: no data to test them yet.*", ""]
    lines = ["| claim (source) | bnlab measured | verdict | interval |", "|---|---|---|---|"]
    lines += [f"| {_cell(c.claim)} | {_cell(c.measured)} | {_cell(c.decision.text())} | "
              f"{_cell(c.decision.method or 'none (the rule reads means, ranges or counts)')} |" for c in rows]
    return lines + [""]


# ------------------------------------------------------------------------------ shared figures

def _has_bnstats(d: Prepared) -> bool:
    return not d.curves.empty and d.curves["metric"].eq("bnstats/mean_err").any()


def caption_running_stats(d: Prepared) -> str:
    curves, _, _ = P.running_stats_curves(d.curves)  # what the figure draws
    lines = S.group_finals(curves, ["bnstats/mean_err", "bnstats/var_err"])
    if not lines:
        return "No bnstats/* metrics were logged."
    return "Distance of the running statistics to the precise-BN population statistics at the last epoch: " \
        + "; ".join(lines) + "."


def caption_curves(d: Prepared) -> str:
    lines = S.group_finals(d.curves, ["train/acc", "val/acc"])
    return ("Last-epoch accuracy: " + "; ".join(lines) + ".") if lines else "No finished runs."


RUNNING_STATS = FigureSpec("running_stats", lambda d: P.fig_running_stats(d.curves, runs=d.runs),
                           caption_running_stats, _has_bnstats)
CURVES = FigureSpec("curves", lambda d: P.fig_curves(d.curves, runs=d.runs), caption_curves)


# ------------------------------------------------------------------------------ the default section

def caption_final_by_key(d: Prepared) -> str:
    keys = fr.varying(d.ok)
    if d.ok.empty:
        return "No finished runs."
    parts = []
    for k in keys or [None]:
        groups = [(None, d.ok)] if k is None else list(d.ok.assign(_k=fr.hashable(d.ok[k])).groupby("_k", dropna=False))
        for v, g in groups:
            vals = ", ".join(f"{m} {S.stat(fr.final_col(g, m))}" for m in ("val/acc", "train/acc")
                             if fr.FINAL + m in g)
            parts.append(f"{'all runs' if k is None else f'{k}={fr.fmt_value(v)}'}: {vals}")
    pooled = " (each key pooled over the others)" if len(keys) > 1 else ""
    return "Final accuracies (mean and 95% interval over seeds)" + pooled + ": " + "; ".join(parts) + "."


def default_study(name: str) -> Study:
    """A study without an analysis of its own: the final metrics against each key it varies, with
    seed intervals, beside the curves."""
    return Study(name, figures=[FigureSpec("final_by_key", lambda d: P.fig_final_by_key(d.runs), caption_final_by_key),
                                CURVES], module="default")

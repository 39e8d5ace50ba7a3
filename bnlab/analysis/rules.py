"""Claims a study YAML declares without code (`claims:`; see analysis/study.py for the format): a
paired difference of a final metric between two settings above a threshold, a value within a
tolerance of a reference, a value below or above a bound. Each row states its rule and its verdict
(verdicts.Decision)."""
from __future__ import annotations

from typing import Callable, Dict, List

import pandas as pd

from bnlab.analysis import frames as fr
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V

RULES = ("paired_above", "within", "above", "below")
_NEEDS = {"paired_above": ("metric", "a", "b"), "within": ("metric", "reference", "tolerance"),
          "above": ("metric", "bound"), "below": ("metric", "bound")}


def _select(ok: pd.DataFrame, where: Dict) -> pd.DataFrame:
    sel = ok
    for key, value in (where or {}).items():
        if key not in sel:
            return sel.iloc[:0]
        sel = sel[fr.same(fr.hashable(sel[key]), value).to_numpy()]
    return sel


def _where_text(where: Dict) -> str:
    return ", ".join(f"{k}={fr.fmt_value(v)}" for k, v in (where or {}).items()) or "all runs"


def check(spec, i: int, study: str) -> dict:
    """A declared claim, checked: one line naming the field and what is allowed where it is wrong."""
    where = f"study {study!r}: claims[{i}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping with claim, rule, metric, ..., got {spec!r}")
    rule = spec.get("rule")
    if rule not in RULES:
        raise ValueError(f"{where}.rule must be one of {', '.join(RULES)}, got {rule!r}")
    for key in ("claim", *_NEEDS[rule]):
        if spec.get(key) is None:
            raise ValueError(f"{where}.{key} is required by rule {rule}")
    return spec


def evaluate(spec: dict, ok: pd.DataFrame):
    from bnlab.analysis.study import Claim

    rule, metric = spec["rule"], str(spec["metric"])
    col = fr.FINAL + metric
    if rule == "paired_above":
        a, b = _select(ok, spec["a"]), _select(ok, spec["b"])
        thr = float(spec.get("threshold", 0.0))
        d = S.paired(a, b, col, col)
        decision = V.above(d.tolist(), thr, rule=f"95% CI of the paired difference ({_where_text(spec['a'])}) − "
                                               f"({_where_text(spec['b'])}) of {metric} above {thr:g}")
        measured = (f"{metric}: {_where_text(spec['a'])} {S.acc_text(a.get(col, []), col)}, {_where_text(spec['b'])} "
                    f"{S.acc_text(b.get(col, []), col)}; paired per seed {S.diff_text(d)}")
        return Claim(str(spec["claim"]), measured, decision)
    sel = _select(ok, spec.get("where"))
    values = sel[col].dropna().tolist() if col in sel else []
    measured = f"{metric} ({_where_text(spec.get('where'))}): {S.acc_text(values, col)}"
    if rule == "within":
        ref, tol = float(spec["reference"]), float(spec["tolerance"])
        decision = V.within(values, ref, tol, rule=f"95% CI of the mean {metric} within {tol:g} of {ref:g}")
    else:
        bound = float(spec["bound"])
        fn = V.above if rule == "above" else V.below
        decision = fn(values, bound, rule=f"95% CI of the mean {metric} {rule} {bound:g}")
    return Claim(str(spec["claim"]), measured, decision)


def yaml_claims(specs: List, study: str) -> Callable:
    """The claims function of a study YAML's `claims:` list (checked now, evaluated per report)."""
    checked = [check(s, i, study) for i, s in enumerate(specs)]

    def claims(d) -> List:
        return [evaluate(s, d.ok) for s in checked]

    return claims

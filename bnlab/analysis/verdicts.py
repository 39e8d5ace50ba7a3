"""Three verdicts for a claim: *holds*, *refuted* (the interval excludes the claimed direction or
bound) or *undecided* (the interval spans the threshold), with the interval, n, the rule and, where
undecided, an estimate of the seeds that would decide an effect of the measured size.

Every claim rule of the report returns a `Decision` from one of the functions below."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

HOLDS, REFUTED, UNDECIDED = "holds", "refuted", "undecided"
VERDICTS = (HOLDS, REFUTED, UNDECIDED)

# What each word means, for the report's header.
MEANINGS = {
    HOLDS: "the 95% interval lies entirely on the claimed side of the rule's threshold",
    REFUTED: "the 95% interval excludes the claimed direction or bound",
    UNDECIDED: "the 95% interval spans the threshold: more seeds are needed (the row estimates how many)",
}

T_METHOD = "95% t-interval of the mean over seeds (paired by seed for differences)"


@dataclass(frozen=True)
class Decision:
    verdict: str  # HOLDS, REFUTED or UNDECIDED
    rule: str  # the rule in words, e.g. "95% CI of the paired gain above 0"
    mean: float = float("nan")
    lo: float = float("nan")  # the interval the verdict was read from
    hi: float = float("nan")
    n: int = 0
    method: str = ""  # how the interval was made (empty for a rule without one)
    seeds_needed: Optional[int] = None  # for UNDECIDED: estimated total seeds to decide

    def text(self) -> str:
        """'undecided (rule: ...; +0.012 [-0.004, +0.028], n=5; about 23 seeds would decide it)'."""
        parts = [f"rule: {self.rule}"]
        if self.n and np.isfinite(self.lo) and np.isfinite(self.hi):
            parts.append(f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}], n={self.n}")
        elif self.n:
            parts.append(f"n={self.n}")
        if self.verdict == UNDECIDED and self.seeds_needed is not None:
            parts.append(f"about {self.seeds_needed} seeds would decide it")
        return f"{self.verdict} ({'; '.join(parts)})"


def _finite(values: Iterable[float]) -> np.ndarray:
    return np.asarray([float(x) for x in values if x is not None and np.isfinite(float(x))], dtype=float)


def t_quantile(q: float, df: int) -> float:
    """Student-t quantile (no scipy; the report's own closed-form bisection)."""
    from bnlab.analysis.figures import t_quantile as tq
    return float(tq(q, df))


def t_interval(values: Iterable[float], alpha: float = 0.05):
    """(mean, lo, hi, n, sd): the fixed-n t-interval; lo/hi NaN for n < 2."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0, float("nan")
    if n == 1:
        return float(v[0]), float("nan"), float("nan"), 1, float("nan")
    sd = float(v.std(ddof=1))
    half = t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    m = float(v.mean())
    return m, m - half, m + half, n, sd


def seeds_to_decide(mean: float, sd: float, threshold: float, alpha: float = 0.05) -> Optional[int]:
    """Smallest n whose t half-width at the measured SD is below |mean - threshold|: the seeds that
    would decide an effect of the measured size (None when the effect is 0 or the SD unknown)."""
    d = abs(mean - threshold)
    if not (np.isfinite(sd) and np.isfinite(d)) or d == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, 100_000):
        if t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n) < d:
            return n
    return None


def above(values: Iterable[float], threshold: float = 0.0, rule: str = "", alpha: float = 0.05) -> Decision:
    """Claim: the true mean of `values` (e.g. per-seed paired differences) is above `threshold`."""
    m, lo, hi, n, sd = t_interval(values, alpha)
    rule = rule or f"95% CI of the mean above {threshold:g}"
    if n < 2:
        return Decision(UNDECIDED, rule, m, lo, hi, n, T_METHOD, None)
    verdict = HOLDS if lo > threshold else REFUTED if hi < threshold else UNDECIDED
    need = seeds_to_decide(m, sd, threshold, alpha) if verdict == UNDECIDED else None
    return Decision(verdict, rule, m, lo, hi, n, T_METHOD, need)


def below(values: Iterable[float], threshold: float = 0.0, rule: str = "", alpha: float = 0.05) -> Decision:
    """Claim: the true mean of `values` is below `threshold`."""
    m, lo, hi, n, sd = t_interval(values, alpha)
    rule = rule or f"95% CI of the mean below {threshold:g}"
    if n < 2:
        return Decision(UNDECIDED, rule, m, lo, hi, n, T_METHOD, None)
    verdict = HOLDS if hi < threshold else REFUTED if lo > threshold else UNDECIDED
    need = seeds_to_decide(m, sd, threshold, alpha) if verdict == UNDECIDED else None
    return Decision(verdict, rule, m, lo, hi, n, T_METHOD, need)


def within(values: Iterable[float], reference: float, tol: float, rule: str = "",
           alpha: float = 0.05) -> Decision:
    """Claim: the true mean of `values` is within `tol` of `reference`. Holds when the whole interval
    is inside [reference - tol, reference + tol], refuted when it is entirely outside."""
    m, lo, hi, n, sd = t_interval(values, alpha)
    rule = rule or f"95% CI of the mean within {tol:g} of {reference:g}"
    if n < 2:
        return Decision(UNDECIDED, rule, m, lo, hi, n, T_METHOD, None)
    a, b = reference - tol, reference + tol
    if a <= lo and hi <= b:
        verdict = HOLDS
    elif hi < a or lo > b:
        verdict = REFUTED
    else:
        verdict = UNDECIDED
    need = None
    if verdict == UNDECIDED:
        edge = a if abs(m - a) < abs(m - b) else b
        need = seeds_to_decide(m, sd, edge, alpha)
    return Decision(verdict, rule, m, lo, hi, n, T_METHOD, need)


def from_bool(ok: Optional[bool], rule: str, n: int = 0) -> Decision:
    """A rule with no interval (a range, a ratio of SDs): True -> holds, False -> refuted,
    None (no data) -> undecided."""
    verdict = UNDECIDED if ok is None else HOLDS if ok else REFUTED
    return Decision(verdict, rule, n=n)

"""Three verdicts for a claim: *holds*, *refuted* (the interval excludes the claimed direction or
bound) or *undecided* (the interval spans the threshold), with the interval, n, the rule and, where
undecided, an estimate of the seeds that would decide an effect of the measured size.

Every claim rule of the report returns a `Decision` from one of the functions below. The interval
is the fixed-n t-interval (seeds fixed before the runs) or, inside `using(SEQUENTIAL)` (what
bnlab-decide and the report use for a study whose seeds were added round by round until decided),
an anytime-valid confidence sequence that stays valid when the verdict is read after every round."""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np

HOLDS, REFUTED, UNDECIDED = "holds", "refuted", "undecided"
VERDICTS = (HOLDS, REFUTED, UNDECIDED)

# What each word means, for the report's header.
MEANINGS = {
    HOLDS: "the 95% interval lies entirely on the claimed side of the rule's threshold",
    REFUTED: "the 95% interval excludes the claimed direction or bound",
    UNDECIDED: "the 95% interval spans the threshold: more seeds are needed (the row estimates how many)",
}

# The two interval methods, by short name (Decision.method holds the long text).
FIXED, SEQUENTIAL = "t", "sequential"

T_METHOD = "95% t-interval of the mean over seeds (paired by seed for differences)"

# Prior variance g of the standardised effect delta = mean / SD in the mixture below. Chosen once,
# before any data: the sequence is finite from 4 seeds on, narrowest at about 8 seeds and within 4%
# of the narrowest any g gives at every n from 6 to 20 (tests/test_verdicts_sequential.py checks it).
CS_PRIOR_G = 2.0

CS_METHOD = ("95% anytime-valid confidence sequence of the mean over seeds (paired by seed for differences): "
             "Lai's (1976) scale-invariant t-mixture, Gaussian per-seed values with unknown SD, "
             f"prior N(0, {CS_PRIOR_G:g}) on mean/SD; valid however often it is looked at "
             "(Ville's inequality; Howard, Ramdas, McAuliffe & Sekhon 2021)")

METHODS = {FIXED: T_METHOD, SEQUENTIAL: CS_METHOD}

# For the report's header: when each interval is used, and how rows estimate the seeds still needed.
METHODS_TEXT = (
    f"Verdicts read the claim's 95% interval. For a study whose seeds were fixed before it ran: the {T_METHOD}. "
    f"For a study run by bnlab-decide (seeds added round by round, the verdicts read after every round): the "
    f"{CS_METHOD}; a fixed-n interval read after every round would declare far more false decisions "
    "(simulated: about 11% false 'holds' instead of 2.5% over 10 rounds of 2 seeds). An undecided row's seed "
    "estimate is for bnlab-decide, the way seeds are added to a study: the smallest number of seeds at which "
    "the confidence sequence, at the measured mean and SD, would exclude the threshold (a plug-in figure, not a "
    "guarantee).")

_METHOD: contextvars.ContextVar[str] = contextvars.ContextVar("bnlab_verdict_method", default=FIXED)


@contextlib.contextmanager
def using(method: str) -> Iterator[None]:
    """`with using(SEQUENTIAL): ...`: the verdict functions called inside read that interval."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    token = _METHOD.set(method)
    try:
        yield
    finally:
        _METHOD.reset(token)


def current_method() -> str:
    return _METHOD.get()


# Tag bnlab-decide sets on every run of a study it decided; a study with such runs is read sequentially.
VERDICTS_TAG = "bnlab.verdicts"


def method_for(runs) -> str:
    """SEQUENTIAL when any run of the frame (bnlab.analysis.runs.load_runs) carries the tag
    bnlab.verdicts=sequential (bnlab-decide added seeds to the study round by round), else FIXED."""
    col = f"tags.{VERDICTS_TAG}"
    if runs is not None and col in getattr(runs, "columns", ()):
        if (runs[col].astype(object) == SEQUENTIAL).any():
            return SEQUENTIAL
    return FIXED


@dataclass(frozen=True)
class Decision:
    verdict: str  # HOLDS, REFUTED or UNDECIDED
    rule: str  # the rule in words, e.g. "95% CI of the paired gain above 0"
    mean: float = float("nan")
    lo: float = float("nan")  # the interval the verdict was read from
    hi: float = float("nan")
    n: int = 0
    method: str = ""  # how the interval was made (empty for a rule without one)
    # For UNDECIDED: estimated total seeds to decide, under the confidence sequence whatever the
    # interval (more seeds are added round by round, by bnlab-decide, which reads it sequentially).
    seeds_needed: Optional[int] = None

    @property
    def sequential(self) -> bool:
        return self.method == CS_METHOD

    def text(self) -> str:
        """'undecided (rule: ...; +0.012 [-0.004, +0.028], n=5; about 23 seeds would decide it)';
        an anytime-valid interval is marked 'anytime-valid' after it."""
        parts = [f"rule: {self.rule}"]
        mark = " anytime-valid" if self.sequential else ""
        if self.n and np.isfinite(self.lo) and np.isfinite(self.hi):
            parts.append(f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]{mark}, n={self.n}")
        elif self.n and self.sequential and np.isfinite(self.mean):
            parts.append(f"{self.mean:+.3f} [-inf, +inf]{mark}, n={self.n}")
        elif self.n:
            parts.append(f"n={self.n}")
        if self.verdict == UNDECIDED and self.seeds_needed is not None:
            parts.append(f"about {self.seeds_needed} seeds would decide it")
        return f"{self.verdict} ({'; '.join(parts)})"


def _finite(values: Iterable[float]) -> np.ndarray:
    return np.asarray([float(x) for x in values if x is not None and np.isfinite(float(x))], dtype=float)


def t_quantile(q: float, df: int) -> float:
    """Student-t quantile (no scipy; the report's own closed-form bisection)."""
    try:
        from bnlab.analysis.stats import t_quantile as tq  # where the analysis split puts it
    except ImportError:
        from bnlab.analysis.figures import t_quantile as tq
    return float(tq(q, df))


# ------------------------------------------------------------------------------ the confidence sequence
#
# Lai (1976), "On confidence sequences", Ann. Statist. 4: for i.i.d. N(mu, sigma^2) with sigma unknown,
# mix the likelihood of the scale-invariant reduction of the data (x_i - mu0) over the standardised
# effect delta ~ N(0, g), with the right-Haar prior 1/sigma on the scale. The mixture ratio
#
#     B_n(mu0) = (1 + n g)^(-1/2) * ((nu + t^2) / (nu + t^2 / (1 + n g)))^(n/2),   nu = n - 1,
#
# with t = sqrt(n) (mean - mu0) / s the usual t-statistic, is the likelihood ratio of the maximal
# invariant (Wijsman's theorem), hence a nonnegative martingale with B_1 = 1 under mu = mu0 whatever
# sigma is (Perez-Ortiz, Lardy, de Heide & Grunwald 2024, "E-statistics, group invariance and anytime
# valid testing"). Ville's inequality gives P(sup_n B_n(mu) >= 1/alpha) <= alpha, so
# C_n = {mu0 : B_n(mu0) < 1/alpha} covers mu at every n at once with probability >= 1 - alpha: a
# confidence sequence (Howard et al. 2021's term). B_n rises with t^2, so C_n = mean +- T_n s / sqrt(n)
# with T_n solving B_n = 1/alpha in closed form (below); C_n is the whole line while
# sup_t B_n = (1 + n g)^((n-1)/2) <= 1/alpha. The Gaussian assumption is the t-interval's own.

def mixture_e_value(values: Iterable[float], mu0: float, g: float = CS_PRIOR_G) -> float:
    """B_n(mu0) above, in float64 (1.0 for n < 2; inf when every value equals mean != mu0)."""
    v = _finite(values)
    n = len(v)
    if n < 2:
        return 1.0
    s = float(v.std(ddof=1))
    d = float(v.mean()) - mu0
    if s == 0:
        return 1.0 if d == 0 else math.inf
    t2 = n * d * d / (s * s)
    nu, r = n - 1, 1.0 + n * g
    return math.exp(-0.5 * math.log(r) + 0.5 * n * (math.log(nu + t2) - math.log(nu + t2 / r)))


def cs_t_boundary(n: int, alpha: float = 0.05, g: float = CS_PRIOR_G) -> float:
    """T_n: the |t| at which B_n = 1/alpha (inf where the sequence is still the whole line).
    From (1+ng)^(-1/2) ((nu+T^2)/(nu+T^2/r))^(n/2) = 1/alpha with r = 1+ng and c = (r/alpha^2)^(1/n):
    nu + T^2 = c (nu + T^2/r), so T^2 = nu (c - 1) / (1 - c/r), finite iff c < r."""
    if n < 2:
        return math.inf
    r, nu = 1.0 + n * g, n - 1
    log_c = (math.log(r) - 2.0 * math.log(alpha)) / n
    if log_c >= math.log(r):
        return math.inf
    c = math.exp(log_c)
    return math.sqrt(nu * math.expm1(log_c) / (1.0 - c / r))


def _quantile(n: int, alpha: float, method: str) -> float:
    """The factor q of the half-width q * sd / sqrt(n) under `method`."""
    if n < 2:
        return math.inf
    return t_quantile(1 - alpha / 2, n - 1) if method == FIXED else cs_t_boundary(n, alpha)


def bounds(x: np.ndarray, alpha: float = 0.05,
           method: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lo, hi) of each row of x (rows: studies, columns: their n seeds, all finite), under
    `method` (default: the current one). The same code gives every Decision's interval, so the
    simulation tests exercise what the report prints."""
    x = np.asarray(x, dtype=float)
    n = x.shape[-1]
    m = x.mean(axis=-1)
    if n < 2:
        return m, np.full_like(m, np.nan), np.full_like(m, np.nan)
    q = _quantile(n, alpha, method or current_method())
    if not np.isfinite(q):  # a confidence sequence that is still the whole line
        return m, np.full_like(m, -np.inf), np.full_like(m, np.inf)
    half = q * x.std(axis=-1, ddof=1) / math.sqrt(n)
    return m, m - half, m + half


def interval(values: Iterable[float], alpha: float = 0.05, method: Optional[str] = None):
    """(mean, lo, hi, n, sd) of the finite values under `method` (default: the current one); lo/hi
    NaN for n < 2, and -inf/+inf where a confidence sequence is still the whole line."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0, float("nan")
    if n == 1:
        return float(v[0]), float("nan"), float("nan"), 1, float("nan")
    m, lo, hi = bounds(v, alpha, method)
    return float(m), float(lo), float(hi), n, float(v.std(ddof=1))


def t_interval(values: Iterable[float], alpha: float = 0.05):
    """(mean, lo, hi, n, sd): the fixed-n t-interval; lo/hi NaN for n < 2."""
    return interval(values, alpha, FIXED)


SEEDS_MAX = 1000  # seeds_to_decide answers None beyond this (no study here runs that many)


def seeds_to_decide(mean: float, sd: float, threshold: float, alpha: float = 0.05,
                    method: Optional[str] = None) -> Optional[int]:
    """Smallest n whose half-width under `method` (default: the current one) at the measured SD is
    below |mean - threshold|: the seeds that would decide an effect of the measured size, if the
    mean and SD stayed as measured (None when the effect is 0, the SD unknown, or more than
    SEEDS_MAX seeds would be needed)."""
    method = method or current_method()
    d = abs(mean - threshold)
    if not (np.isfinite(sd) and np.isfinite(d)) or d == 0:
        return None
    if sd == 0:
        return 2 if method == FIXED else next(n for n in range(2, 100) if np.isfinite(cs_t_boundary(n, alpha)))
    # The half-width falls with n under both methods: doubling, then bisection, up to SEEDS_MAX.
    def decides(k: int) -> bool:
        return _quantile(k, alpha, method) * sd / math.sqrt(k) < d

    lo, hi = 1, 2
    while not decides(hi):
        if hi >= SEEDS_MAX:
            return None
        lo, hi = hi, min(2 * hi, SEEDS_MAX)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return hi


# ------------------------------------------------------------------------------ the verdicts

def read_above(lo, hi, threshold: float):
    """HOLDS where lo > threshold, REFUTED where hi < threshold, else UNDECIDED (arrays or scalars)."""
    return np.where(np.asarray(lo) > threshold, HOLDS, np.where(np.asarray(hi) < threshold, REFUTED, UNDECIDED))


def read_below(lo, hi, threshold: float):
    return np.where(np.asarray(hi) < threshold, HOLDS, np.where(np.asarray(lo) > threshold, REFUTED, UNDECIDED))


def read_within(lo, hi, a: float, b: float):
    lo, hi = np.asarray(lo), np.asarray(hi)
    return np.where((a <= lo) & (hi <= b), HOLDS, np.where((hi < a) | (lo > b), REFUTED, UNDECIDED))


def _method_args(method: Optional[str]) -> Tuple[str, str]:
    method = method or current_method()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method, METHODS[method]


def _one_sided(values, threshold: float, rule: str, alpha: float, method: Optional[str], read) -> Decision:
    """A claim on one side of `threshold`, read from the interval by `read` (read_above/read_below)."""
    method, text = _method_args(method)
    m, lo, hi, n, sd = interval(values, alpha, method)
    if n < 2:
        return Decision(UNDECIDED, rule, m, lo, hi, n, text, None)
    verdict = str(read(lo, hi, threshold))
    need = seeds_to_decide(m, sd, threshold, alpha, SEQUENTIAL) if verdict == UNDECIDED else None
    return Decision(verdict, rule, m, lo, hi, n, text, need)


def above(values: Iterable[float], threshold: float = 0.0, rule: str = "", alpha: float = 0.05,
          method: Optional[str] = None) -> Decision:
    """Claim: the true mean of `values` (e.g. per-seed paired differences) is above `threshold`."""
    return _one_sided(values, threshold, rule or f"95% CI of the mean above {threshold:g}", alpha, method,
                      read_above)


def below(values: Iterable[float], threshold: float = 0.0, rule: str = "", alpha: float = 0.05,
          method: Optional[str] = None) -> Decision:
    """Claim: the true mean of `values` is below `threshold`."""
    return _one_sided(values, threshold, rule or f"95% CI of the mean below {threshold:g}", alpha, method,
                      read_below)


def within(values: Iterable[float], reference: float, tol: float, rule: str = "",
           alpha: float = 0.05, method: Optional[str] = None) -> Decision:
    """Claim: the true mean of `values` is within `tol` of `reference`. Holds when the whole interval
    is inside [reference - tol, reference + tol], refuted when it is entirely outside."""
    method, text = _method_args(method)
    m, lo, hi, n, sd = interval(values, alpha, method)
    rule = rule or f"95% CI of the mean within {tol:g} of {reference:g}"
    if n < 2:
        return Decision(UNDECIDED, rule, m, lo, hi, n, text, None)
    a, b = reference - tol, reference + tol
    verdict = str(read_within(lo, hi, a, b))
    need = None
    if verdict == UNDECIDED:
        edge = a if abs(m - a) < abs(m - b) else b
        need = seeds_to_decide(m, sd, edge, alpha, SEQUENTIAL)
    return Decision(verdict, rule, m, lo, hi, n, text, need)


def from_bool(ok: Optional[bool], rule: str, n: int = 0) -> Decision:
    """A rule with no interval (a range, a ratio of SDs): True -> holds, False -> refuted,
    None (no data) -> undecided. Such a rule has no sequential guarantee: bnlab-decide counts it
    decided as soon as it has data."""
    verdict = UNDECIDED if ok is None else HOLDS if ok else REFUTED
    return Decision(verdict, rule, n=n)

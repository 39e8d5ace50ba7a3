"""The statistics kit of the report: t-intervals over seeds (a logit-scale interval for accuracies),
paired differences, group aggregates, and their text ("0.853 [0.840, 0.866] (n=3)"). Pure functions
of numbers and frames; no plotting."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, List, Sequence, Tuple

import numpy as np
import pandas as pd

from bnlab.analysis import frames as fr


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 2/pi [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)]
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile for p > 0.5 and integer df (no scipy): bisection on the closed-form CDF."""
    if df < 1:
        return float("nan")
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _t_central(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Iterable[float], level: float = 0.95) -> Tuple[float, float, int]:
    """(mean, half-width of the t-interval, n) over the finite values; half-width NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), 1
    half = t_quantile(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


# Accuracies are fractions in [0, 1]: their interval is a t-interval of logit(value) mapped back,
# which never leaves (0, 1). Values are clipped to [ACC_CLIP, 1 - ACC_CLIP] first (logit(0) = -inf).
ACC_CLIP = 1e-3

CI_METHOD = ("accuracies: 95% t-interval of the mean of logit(accuracy) over seeds, mapped back "
             "through the logistic function (always inside [0, 1]; values clipped to [0.001, 0.999]); "
             "other quantities: mean ± the half-width of the 95% t-interval")


def is_accuracy(name: str) -> bool:
    """train/acc, val/acc, val/acc_precise_bn/16, step/val/acc_shadow/0.1 (with or without final/):
    fractions in [0, 1]. gap/acc (a difference) is not one."""
    parts = str(name).split("/")
    while parts and parts[0] in ("final", "step"):
        parts = parts[1:]
    return len(parts) >= 2 and parts[0] in ("train", "val") and parts[1].startswith("acc")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, ACC_CLIP, 1 - ACC_CLIP)
    return np.log(p / (1 - p))


def acc_interval(values: Iterable[float], level: float = 0.95) -> Tuple[float, float]:
    """(low, high) of the 95% interval for a mean accuracy: t-interval on the logit scale, mapped
    back; (nan, nan) for fewer than 2 finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    z = logit(v)
    half = t_quantile(0.5 + level / 2, len(v) - 1) * z.std(ddof=1) / math.sqrt(len(v))
    lo, hi = z.mean() - half, z.mean() + half
    return float(1 / (1 + math.exp(-lo))), float(1 / (1 + math.exp(-hi)))


def interval(values, name: str = "") -> Tuple[float, float, float, int]:
    """(mean, low, high, n): the logit interval for an accuracy (by `name`, or the Series' own
    name), mean ± t half-width otherwise."""
    name = name or str(getattr(values, "name", "") or "")
    vals = list(values)
    m, ci, n = mean_ci(vals)
    if is_accuracy(name):
        lo, hi = acc_interval(vals)
    else:
        lo, hi = m - ci, m + ci
    return m, lo, hi, n


def aggregate(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Mean, 95% CI half-width, n, and the band (lo, hi) of `value` per group of `by` (nulls are a
    group: bn.momentum NaN = cumulative). Non-finite values are not averaged. The band is the
    logit-scale interval (acc_interval) where the values are accuracies (the column is one, or in a
    curves frame, value="value" and every metric is one; column `bounded`), mean ± ci otherwise."""
    if df.empty:
        return pd.DataFrame(columns=[*by, "mean", "ci", "n", "lo", "hi", "bounded"])
    metrics = df["metric"].dropna().unique() if value == "value" and "metric" in df else [value]
    acc = len(metrics) > 0 and all(is_accuracy(m) for m in metrics)
    d = df[list(by)].apply(fr.hashable).assign(_v=df[value].astype(float).where(np.isfinite(df[value].astype(float))))
    grouped = d.groupby(list(by), dropna=False, sort=True)["_v"]
    g = grouped.agg(["mean", "std", "count"]).reset_index()
    t = g["count"].map(lambda n: t_quantile(0.975, int(n) - 1) if n >= 2 else float("nan"))
    g["ci"] = t * g["std"] / np.sqrt(g["count"].clip(lower=1))
    g = g.rename(columns={"count": "n"}).drop(columns="std")
    g["n"] = g["n"].astype(int)
    if acc:
        # Same groupby, same order: one (lo, hi) pair per row of g.
        pairs = grouped.agg(lambda v: acc_interval(v.tolist())).tolist()
        g["lo"], g["hi"] = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        g["lo"], g["hi"] = g["mean"] - g["ci"], g["mean"] + g["ci"]
    g["bounded"] = acc
    return g[g["n"] > 0].reset_index(drop=True)


def stat(values) -> str:
    """'0.153 ± 0.021 (n=3)': mean ± 95% t-interval half-width over seeds; no ± for n=1. For an
    accuracy (a Series named like final/val/acc) the logit-scale interval: '0.853 [0.840, 0.866] (n=3)'."""
    if is_accuracy(str(getattr(values, "name", "") or "")):
        return acc_text(values, str(values.name))
    m, ci, n = mean_ci(values)
    if n == 0:
        return "n/a"
    return f"{m:.3f} ± {ci:.3f} (n={n})" if np.isfinite(ci) else f"{m:.3f} (n={n})"


def agg_text(row) -> str:
    ci = row["ci"]
    n = int(row["n"])
    if bool(row.get("bounded", False)) and np.isfinite(row.get("lo", np.nan)):
        return f"{row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}] (n={n})"
    return f"{row['mean']:.3f} ± {ci:.3f} (n={n})" if np.isfinite(ci) else f"{row['mean']:.3f} (n={n})"


def acc_text(values, name: str = fr.FINAL + "val/acc") -> str:
    """'0.853 [0.840, 0.866] (n=3)': mean and the 95% interval of the report header."""
    m, lo, hi, n = interval(pd.Series(values, dtype=float).dropna(), name)
    if n == 0:
        return "n/a"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}] (n={n})" if np.isfinite(lo) else f"{m:.3f} (n={n})"


def diff(values) -> tuple:
    """(mean, low, high, n) of a per-seed difference: mean ± the 95% t half-width."""
    m, ci, n = mean_ci(pd.Series(values, dtype=float).dropna())
    return m, m - ci, m + ci, n


def diff_text(values, unit: str = "") -> str:
    m, lo, hi, n = diff(values)
    if n == 0:
        return "n/a"
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{unit} (n={n})" if np.isfinite(lo) else f"{m:+.3f}{unit} (n={n})"


def paired(a: pd.DataFrame, b: pd.DataFrame, col_a: str, col_b: str) -> pd.Series:
    """Per seed: a[col_a] - b[col_b] (seeds present in both)."""
    x = a.set_index("seed")[col_a] if col_a in a else pd.Series(dtype=float)
    y = b.set_index("seed")[col_b] if col_b in b else pd.Series(dtype=float)
    return (x - y).dropna()


def group_finals(curves: pd.DataFrame, metrics: Sequence[str], max_groups: int = 8) -> List[str]:
    """'<group>: metric a, metric b' at each run's last logged step, per config group."""
    ok = fr.usable_curves(curves)
    ok = ok[ok["metric"].isin(metrics)] if not ok.empty else ok
    if ok.empty:
        return []
    last = ok.sort_values("step").groupby(["run_id", "metric"]).tail(1)
    wide = last.pivot(index="run_id", columns="metric", values="value")
    meta = ok.drop_duplicates("run_id").set_index("run_id")
    groups = fr.varying(meta.reset_index())
    wide = wide.join(meta[groups]) if groups else wide
    out = []
    keys = wide[groups].apply(fr.hashable).drop_duplicates() if groups else pd.DataFrame(index=[0])
    for _, key in keys.head(max_groups).iterrows():
        sel = wide
        for c in groups:
            sel = sel[fr.same(sel[c].pipe(fr.hashable), key[c])]
        vals = ", ".join(f"{m} {stat(sel[m])}" for m in metrics if m in sel)
        out.append(f"{fr.group_label(key, groups)}: {vals}")
    if len(keys) > max_groups:
        out.append(f"(and {len(keys) - max_groups} more groups in summary.csv)")
    return out

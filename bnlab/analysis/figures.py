"""Report figures as pure functions: frames from analysis/runs.py in, a matplotlib Figure out (no
MLflow, no files, no pyplot state). Seeds are averaged with a 95% band (none for n=1): a t-interval
on the logit scale for accuracies (it stays inside [0, 1]), a t-interval otherwise; where n <= 5
each seed is also drawn as a thin line. Failed/running runs are left out and counted in a
footnote; diverged runs are marked, never dropped."""
from __future__ import annotations

import math
import textwrap
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

CHANCE = 0.1  # 10 classes: Fashion-MNIST and the synthetic set
FINAL = "final/"
SHADOW = "final/val/acc_shadow/"
RUN_COLUMNS = {"run_id", "run_name", "experiment", "study", "status", "role", "diverged", "diverged_epoch",
               "parent_run_id", "config_hash", "git_commit", "git_dirty", "error", "start_time", "end_time",
               "metric", "step", "value", "momentum_source", "collapsed"}
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan"]
PLACEMENT_LABEL = {"before_act": "BN before activation", "after_act": "BN after activation", "none": "no BN"}
PLACEMENT_COLOR = {"before_act": "tab:blue", "after_act": "tab:orange", "none": "tab:gray"}
ACC = "accuracy (fraction correct)"


# ------------------------------------------------------------------------------ statistics

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
SEED_LINES_MAX_N = 5  # where a group has at most this many seeds, each seed is drawn as a thin line


def is_accuracy(name: str) -> bool:
    """train/acc, val/acc, val/acc_precise_bn/16, step/val/acc_shadow/0.1 (with or without final/):
    fractions in [0, 1]. gap/acc (a difference) is not one."""
    parts = str(name).split("/")
    while parts and parts[0] in ("final", "step"):
        parts = parts[1:]
    return len(parts) >= 2 and parts[0] in ("train", "val") and parts[1].startswith("acc")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, ACC_CLIP, 1 - ACC_CLIP)
    return np.log(p / (1 - p))


def acc_interval(values: Iterable[float], level: float = 0.95) -> Tuple[float, float]:
    """(low, high) of the 95% interval for a mean accuracy: t-interval on the logit scale, mapped
    back; (nan, nan) for fewer than 2 finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    z = _logit(v)
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


def _yerr(m: float, lo: float, hi: float):
    """Error-bar lengths for matplotlib from an interval; None where there is none. The logit
    interval is that of the mean logit, so a skewed sample's arithmetic mean can sit just outside
    it: the bar then starts at the point (length 0 on that side)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [[max(0.0, m - lo)], [max(0.0, hi - m)]]


def _hashable(s: pd.Series) -> pd.Series:
    return s.map(lambda v: tuple(v) if isinstance(v, list) else v) if s.dtype == object else s


def aggregate(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Mean, 95% CI half-width, n, and the band (lo, hi) of `value` per group of `by` (nulls are a
    group: bn.momentum NaN = cumulative). Non-finite values are not averaged. The band is the
    logit-scale interval (acc_interval) where the values are accuracies (the column is one, or in a
    curves frame, value="value" and every metric is one; column `bounded`), mean ± ci otherwise."""
    if df.empty:
        return pd.DataFrame(columns=[*by, "mean", "ci", "n", "lo", "hi", "bounded"])
    metrics = df["metric"].dropna().unique() if value == "value" and "metric" in df else [value]
    acc = len(metrics) > 0 and all(is_accuracy(m) for m in metrics)
    d = df[list(by)].apply(_hashable).assign(_v=df[value].astype(float).where(np.isfinite(df[value].astype(float))))
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


def _ci(agg: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
    """(low, high) band arrays of an aggregate() frame."""
    return agg["lo"].to_numpy(float), agg["hi"].to_numpy(float)


def param_columns(df: pd.DataFrame) -> List[str]:
    return [c for c in df.columns if c not in RUN_COLUMNS and not c.startswith((FINAL, "tags."))]


def varying(df: pd.DataFrame, exclude: Iterable[str] = ()) -> List[str]:
    """Config params that take more than one value (seed and execution settings excluded)."""
    from bnlab.config import groups_by

    skip = set(exclude)
    out = []
    for c in param_columns(df):
        # Only result fields split groups (bnlab.config.ROLES): the seed is averaged over, extra
        # fields only add metrics, execution fields say where and how a run executed.
        if c in skip or not groups_by(c):
            continue
        if _hashable(df[c]).nunique(dropna=False) > 1:
            out.append(c)
    return out


def split_runs(runs: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, int], int]:
    """(usable runs: FINISHED and not diverged, {status: count} of runs left out, n diverged)."""
    if runs.empty or "status" not in runs:
        return runs, {}, 0
    finished = runs["status"].eq("FINISHED")
    diverged = runs["diverged"].astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    left = runs.loc[~finished, "status"].value_counts().to_dict()
    counts = {str(k): int(v) for k, v in sorted(left.items())}
    return runs[finished & ~diverged], counts, int((finished & diverged).sum())


def left_out_text(left: Dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in left.items())


def _run_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run from a runs or curves frame (for the footnote counts)."""
    return frame.drop_duplicates("run_id") if "metric" in frame else frame


def _notes(frame: pd.DataFrame, diverged_how: str, pooled: Sequence[str] = ()) -> List[str]:
    _, left, n_div = split_runs(_run_level(frame))
    notes = []
    if left:
        notes.append(f"left out: {left_out_text(left)} run(s)")
    if n_div:
        notes.append(f"{n_div} diverged run(s) {diverged_how}")
    if pooled:
        notes.append("pooled over " + ", ".join(pooled))
    return notes


def shadow_momenta(runs: pd.DataFrame) -> List[float]:
    return sorted(float(c[len(SHADOW):]) for c in runs.columns if c.startswith(SHADOW))


def shadow_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with val/acc_shadow/<m> metrics -> one row per effective momentum: the run's own row
    (momentum_source 'run') plus, per shadow m, a copy with bn.momentum = m, final/val/acc = the
    shadow's accuracy and final/gap/acc = final/train/acc - it (momentum does not change training,
    so the train accuracy is shared). A shadow equal to the run's own momentum is not duplicated."""
    base = runs.assign(momentum_source="run")
    parts = [base]
    for m in shadow_momenta(runs):
        col = f"{SHADOW}{m:g}"
        if col not in runs:  # the metric name is f"{m:g}"; the parsed float prints the same
            col = next(c for c in runs.columns if c.startswith(SHADOW) and float(c[len(SHADOW):]) == m)
        has = runs[col].notna() & ~np.isclose(runs["bn.momentum"].astype(float).fillna(-1.0), m)
        if not has.any():
            continue
        s = runs[has].copy()
        s["bn.momentum"] = m
        s[FINAL + "val/acc"] = s[col]
        if FINAL + "train/acc" in s:
            s[FINAL + "gap/acc"] = s[FINAL + "train/acc"] - s[col]
        s["momentum_source"] = "shadow"
        parts.append(s)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------ drawing helpers

def fmt_value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "None"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def momentum_label(m: float) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "None (cumulative)"
    if m == 0:
        return "0 (never updated)"
    return f"{m:g} (decay {1 - m:g})"


def group_label(row, cols: Sequence[str]) -> str:
    if not cols:
        return "all runs"
    parts = []
    for c in cols:
        v = row[c]
        parts.append(f"momentum {momentum_label(v)}" if c == "bn.momentum" else f"{c}={fmt_value(v)}")
    return ", ".join(parts)


def _band(ax, x, mean, ci, label: str, color, marker: str = "o", ls: str = "-", zorder: int = 2):
    """The mean as a line and its 95% band: `ci` is a half-width array or a (low, high) pair."""
    x, mean = np.asarray(x, float), np.asarray(mean, float)
    if isinstance(ci, tuple):
        lo, hi = (np.asarray(a, float) for a in ci)
    else:
        ci = np.asarray(ci, float)
        lo, hi = mean - ci, mean + ci
    order = np.argsort(x)
    x, mean, lo, hi = x[order], mean[order], lo[order], hi[order]
    (line,) = ax.plot(x, mean, marker=marker, ls=ls, color=color, label=label, ms=4, zorder=zorder)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(x, np.where(ok, lo, mean), np.where(ok, hi, mean),
                        color=color, alpha=0.2, lw=0, zorder=zorder - 1)
    return line


def _seed_lines(ax, frame: pd.DataFrame, x: str, y: str, color, by: str = "seed") -> None:
    """Each seed (or run, by="run_id") as a thin line under the mean, where there are at most
    SEED_LINES_MAX_N of them: with so few seeds the band alone hides how they scatter."""
    if frame.empty or by not in frame or y not in frame or x not in frame:
        return
    keys = frame[by].dropna().unique()
    if not 0 < len(keys) <= SEED_LINES_MAX_N:
        return
    for k in keys:
        g = frame[frame[by] == k].sort_values(x)
        ax.plot(g[x].to_numpy(float), g[y].to_numpy(float), color=color, lw=0.6, alpha=0.45,
                zorder=1, label="_seed")


def _new(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8, **kw):
    fig = Figure(figsize=(width * ncols + 2.2, height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _finish(fig: Figure, title: str, notes: Sequence[str] = (), legend_axes=None) -> Figure:
    # Left-aligned and wrapped to the figure's width: clear of the legend column on the right.
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 7.5), break_on_hyphens=False), fontsize=11, x=0.01, ha="left")
    handles, labels, seen = [], [], set()
    for ax in (legend_axes if legend_axes is not None else fig.axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen and not lab.startswith("_"):
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:  # outside the axes: a legend never hides data
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    if notes:
        fig.supxlabel("; ".join(notes), fontsize=8, color="0.3", x=0.01, ha="left")
    return fig


def _empty(title: str, why: str, notes: Sequence[str] = ()) -> Figure:
    fig, axes = _new()
    ax = axes[0, 0]
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return _finish(fig, title, notes)


def _chance(ax, label: bool = True):
    ax.axhline(CHANCE, color="0.5", ls=":", lw=1, label="chance (10 classes)" if label else "_chance")


def _epoch_axis(ax):
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_ticks(ax, values: Sequence[float], base: int = 10):
    ax.set_xscale("log", base=base)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _usable_curves(curves: pd.DataFrame) -> pd.DataFrame:
    if curves.empty:
        return curves
    return curves[curves["status"].eq("FINISHED") & ~curves["diverged"].astype(bool)]


def _curve_groups(ax, curves: pd.DataFrame, metric: str, groups: Sequence[str], colors=None, ls="-",
                  log: bool = False):
    """One line per group, per step: mean and 95% band over seeds (logit-scale for accuracies), and
    each run as a thin line where a group has at most SEED_LINES_MAX_N runs. With log=True (for a
    log axis) the mean and CI are those of log10(value), drawn back as 10**: the geometric mean
    and a band that stays positive (a t-interval of the raw values runs below zero on a log axis)."""
    sub = curves[curves["metric"] == metric]
    if log:
        sub = sub[sub["value"] > 0].assign(value=np.log10(sub.loc[sub["value"] > 0, "value"]))
    if sub.empty:
        return
    agg = aggregate(sub, [*groups, "step"], "value")
    keys = agg[list(groups)].drop_duplicates() if groups else pd.DataFrame(index=[0])
    for i, (_, key) in enumerate(keys.iterrows()):
        g, runs_g = agg, sub
        for c in groups:
            g = g[_same(g[c], key[c])]
            runs_g = runs_g[_same(_hashable(runs_g[c]), key[c])]
        color = (colors or {}).get(i, COLORS[i % len(COLORS)])
        if log:
            x, m, ci = (g[c].to_numpy(float) for c in ("step", "mean", "ci"))
            ax.plot(x, 10 ** m, marker="o", ls=ls, color=color, label=group_label(key, groups), ms=4)
            ci = np.where(np.isfinite(ci), ci, 0.0)
            ax.fill_between(x, 10 ** (m - ci), 10 ** (m + ci), color=color, alpha=0.2, lw=0)
            _seed_lines(ax, runs_g.assign(value=10 ** runs_g["value"]), "step", "value", color, by="run_id")
        else:
            _band(ax, g["step"], g["mean"], _ci(g), group_label(key, groups), color, ls=ls)
            _seed_lines(ax, runs_g, "step", "value", color, by="run_id")


def is_missing(v) -> bool:
    """None, NaN and pd.NA (a nullable column's missing value) alike; a list is never missing."""
    if v is None or v is pd.NA:
        return True
    return isinstance(v, float) and math.isnan(v)


def _same(col: pd.Series, v) -> pd.Series:
    """A boolean mask of the rows of `col` equal to `v` (missing equals missing, never a value)."""
    if is_missing(v):
        return col.map(is_missing).astype(bool)
    return col.map(lambda x: (not is_missing(x)) and bool(x == v)).astype(bool)


# ------------------------------------------------------------------------------ figures

UPDATE_OPS_METRICS = [
    ("train/acc", "train/acc (training mode, running average over the epoch)", "black", "--", "s"),
    ("val/acc", "val/acc, eval mode with the running statistics", "tab:red", "-", "o"),
    ("val/acc_precise_bn", "val/acc with precise BN (statistics recomputed)", "tab:green", "-", "D"),
    ("val/acc_batch_stats", "val/acc with batch statistics (training mode)", "tab:blue", ":", "^"),  # dotted, on top
]


def fig_update_ops(curves: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> Figure:
    """Good training, bad validation, shown and fixed: per epoch, train/acc, eval-mode val/acc
    (running statistics), val/acc with batch statistics and with precise BN, one panel for
    bn.update_stats=true and one for false (the missing update ops). Mean and 95% CI over seeds.
    `runs` (optional) lets the footnote also count runs that logged no point at all."""
    title = "Missing BN update ops: training accuracy is fine, eval-mode validation fails; precise BN repairs it"
    ok = _usable_curves(curves)
    notes = _notes(curves if runs is None else runs, "not averaged")
    if ok.empty or "bn.update_stats" not in ok:
        return _empty(title, "no finished runs", notes)
    values = sorted(ok["bn.update_stats"].dropna().unique(), reverse=True)
    pooled = varying(ok.drop_duplicates("run_id"), exclude=["bn.update_stats"])
    fig, axes = _new(len(values), sharey=True)
    for ax, v in zip(axes[0], values):
        sub = ok[ok["bn.update_stats"] == v]
        for metric, label, color, ls, marker in UPDATE_OPS_METRICS:
            agg = aggregate(sub[sub["metric"] == metric], ["step"], "value")
            if not agg.empty:
                _band(ax, agg["step"], agg["mean"], _ci(agg), label, color, marker, ls)
                _seed_lines(ax, sub[sub["metric"] == metric], "step", "value", color, by="run_id")
        _chance(ax)
        n = sub["run_id"].nunique()
        ax.set_title(f"bn.update_stats={str(bool(v)).lower()}: "
                     + ("statistics updated" if v else "statistics never updated") + f" (n={n} seeds)", fontsize=9)
        _epoch_axis(ax)
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel(ACC)
    return _finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


_SPECIAL = [(0, "0\nnever\nupdated", lambda s: s.eq(0)), (1, "None\ncumu-\nlative", lambda s: s.isna())]


def _special_axis(ax, pts: pd.DataFrame, value: str, bsizes, colors, diverged: pd.DataFrame):
    """Momentum 0 (statistics never move) and None (cumulative average) cannot sit on a log axis:
    they get their own categorical panel left of the break."""
    ax.set_label("special-momenta")
    cats = _SPECIAL
    for x, _, sel in cats:
        k = int(sel(diverged["bn.momentum"]).sum()) if not diverged.empty else 0
        if k and value == FINAL + "val/acc":
            ax.plot([x], [CHANCE], "x", color="k", ms=9, mew=2, label="diverged: run (x, count)")
            ax.annotate(str(k), (x, CHANCE), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    for i, b in enumerate(bsizes):
        sub = pts[pts["data.batch_size"] == b]
        for x, _, sel in cats:
            s = sub[sel(sub["bn.momentum"])]
            if s.empty:
                continue
            m, lo, hi, n = interval(s[value], value)
            err = _yerr(m, lo, hi)
            ax.errorbar([x + (i - (len(bsizes) - 1) / 2) * 0.12], [m], yerr=err,
                        fmt="o", color=colors[i], ms=5, capsize=3, label=f"_special {b}")
    ax.set_xticks([x for x, _, _ in cats], [lab for _, lab, _ in cats], fontsize=7)
    ax.set_xlim(-0.6, 1.6)
    ax.spines["right"].set_visible(False)


def _break_marks(ax_left, ax_right):
    kw = dict(marker=[(-1, -1), (1, 1)], markersize=8, linestyle="none", color="k", mec="k", mew=1, clip_on=False)
    ax_left.plot([1, 1], [0, 1], transform=ax_left.transAxes, **kw)
    ax_right.plot([0, 0], [0, 1], transform=ax_right.transAxes, **kw)


def fig_momentum(runs: pd.DataFrame, shadows: bool = True) -> Figure:
    """Final eval-mode val/acc and the train-val gap vs BN momentum (PyTorch convention, log axis;
    TF/Keras decay = 1 - momentum on the top axis), one line per training batch size, mean and 95%
    CI over seeds. Momentum 0 (never updated) and None (cumulative) sit in a panel left of the
    break. With shadows=True, every val/acc_shadow/<m> metric of a run is a point at momentum m."""
    title = "BN momentum: too small a momentum leaves stale statistics (low eval-mode val/acc, large gap)"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "marked x at chance")
    if ok.empty or "bn.momentum" not in ok:
        return _empty(title, "no finished runs", notes)
    pts = shadow_rows(ok) if shadows else ok.assign(momentum_source="run")
    if shadows and (pts["momentum_source"] == "shadow").any():
        notes.append("points from shadow running averages (val/acc_shadow/<m>) of the same runs")
    bsizes = sorted(pts["data.batch_size"].dropna().unique())
    colors = [COLORS[i % len(COLORS)] for i in range(len(bsizes))]
    fig = Figure(figsize=(9.5, 7.2), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 5], wspace=0.02)
    rows = [(FINAL + "val/acc", "final val/acc, eval mode"), (FINAL + "gap/acc", "gap = train/acc − val/acc")]
    positive = sorted(m for m in pts["bn.momentum"].dropna().unique() if m > 0)
    diverged = runs[runs["status"].eq("FINISHED") & runs["diverged"].astype(bool)]
    for r, (value, ylabel) in enumerate(rows):
        ax = fig.add_subplot(gs[r, 1])
        axl = fig.add_subplot(gs[r, 0], sharey=ax)
        if value not in pts:
            continue
        for i, b in enumerate(bsizes):
            sub = pts[(pts["data.batch_size"] == b) & (pts["bn.momentum"] > 0)]
            agg = aggregate(sub, ["bn.momentum"], value)
            n = aggregate(pts[pts["data.batch_size"] == b], ["bn.momentum"], value)["n"]
            seeds = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}–{n.max()}"
            if not agg.empty:
                _band(ax, agg["bn.momentum"], agg["mean"], _ci(agg), f"batch size {b:g} ({seeds} seeds per point)",
                      colors[i])
                _seed_lines(ax, sub, "bn.momentum", value, colors[i])
        _special_axis(axl, pts, value, bsizes, colors, diverged)
        if r == 0:
            _chance(ax)
            _x_diverged(ax, diverged[diverged["bn.momentum"] > 0], "bn.momentum", "k", "run (x, count)")
        if positive:
            _log_ticks(ax, positive)
        ax.tick_params(labelleft=False)
        ax.spines["left"].set_visible(False)
        axl.set_ylabel(ylabel)
        ax.set_xlabel("bn.momentum (PyTorch: weight of the new batch statistic)")
        _break_marks(axl, ax)
        if r == 0 and positive:
            sec = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
            sec.set_xticks(positive)
            sec.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{1 - v:g}"))
            sec.xaxis.set_minor_locator(NullLocator())
            sec.set_xlabel("TF/Keras decay = 1 − momentum")
    return _finish(fig, title, notes)


def momentum_order(values: Iterable[float]) -> List[float]:
    """0 first, positive momenta ascending, None (cumulative, NaN) last."""
    vals = list(values)
    nan = [v for v in vals if v is None or (isinstance(v, float) and math.isnan(v))]
    real = sorted({float(v) for v in vals if not (v is None or (isinstance(v, float) and math.isnan(v)))})
    return real + ([float("nan")] if nan else [])


def fig_momentum_heatmap(runs: pd.DataFrame, value: str = FINAL + "gap/acc", shadows: bool = True) -> Figure:
    """Heatmap of the train-val gap (default; any final/ metric via `value`) over BN momentum
    (rows, with the TF/Keras decay) x training batch size (columns): mean over seeds, with the
    mean, 95% CI and n written in each cell."""
    title = "Train−val gap by BN momentum and batch size: the gap grows where statistics are stale"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "left out of the means")
    if ok.empty or "bn.momentum" not in ok or value not in ok:
        return _empty(title, "no finished runs", notes)
    pts = shadow_rows(ok) if shadows else ok
    agg = aggregate(pts, ["bn.momentum", "data.batch_size"], value)
    moms = momentum_order(agg["bn.momentum"])
    bss = sorted(agg["data.batch_size"].unique())
    grid = np.full((len(moms), len(bss)), np.nan)
    text = [["–"] * len(bss) for _ in moms]
    for _, r in agg.iterrows():
        i = next(k for k, m in enumerate(moms)
                 if (math.isnan(m) and pd.isna(r["bn.momentum"])) or m == r["bn.momentum"])
        j = bss.index(r["data.batch_size"])
        grid[i, j] = r["mean"]
        ci = f"\n±{r['ci']:.3f}" if np.isfinite(r["ci"]) else ""
        text[i][j] = f"{r['mean']:.3f}{ci}\nn={int(r['n'])}"
    fig = Figure(figsize=(1.3 * len(bss) + 4.2, 0.62 * len(moms) + 2.2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(moms)):
        for j in range(len(bss)):
            light = np.isfinite(grid[i, j]) and grid[i, j] < mid
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xticks(range(len(bss)), [f"{b:g}" for b in bss])
    ax.set_yticks(range(len(moms)), [momentum_label(m) for m in moms], fontsize=8)
    ax.set_xlabel("training batch size (examples)")
    ax.set_ylabel("bn.momentum (TF/Keras decay)")
    fig.colorbar(im, ax=ax, label=value.replace(FINAL, "final ") + (" (train/acc − val/acc)" if "gap" in value else ""))
    return _finish(fig, title, notes)


def _x_diverged(ax, runs: pd.DataFrame, xcol: str, color, label: str, jitter: float = 1.0, row: int = 0):
    """An 'x' at the chance line for every x where runs diverged, with the count below it (one
    row of counts per variant, so that variants at the same x stay readable)."""
    d = runs[runs["status"].eq("FINISHED") & runs["diverged"].astype(bool)]
    if d.empty:
        return
    counts = d.groupby(xcol).size()
    xs = np.asarray(counts.index, float) * jitter
    ax.plot(xs, [CHANCE] * len(xs), "x", color=color, ms=9, mew=2, ls="none", label=f"diverged: {label}")
    for x, c in zip(xs, counts.to_numpy()):
        ax.annotate(str(c), (x, CHANCE), textcoords="offset points", xytext=(0, -12 - 9 * row), ha="center",
                    fontsize=7, color=color)


def fig_batch_size(runs: pd.DataFrame) -> Figure:
    """Final val/acc vs training batch size (log2 axis): with BN, evaluated with the running
    statistics (eval mode), with batch statistics and with precise BN; without BN (eval mode).
    Right panel: batch statistics from ONE example per batch (val/acc_batch_stats_bs1) collapse to
    chance whatever the training batch size. Mean and 95% CI over seeds."""
    title = "Batch size: running, batch and precise-BN statistics; batch statistics of one example collapse"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "marked x at chance")
    if ok.empty or "data.batch_size" not in ok:
        return _empty(title, "no finished runs", notes)
    pooled = varying(ok, exclude=["data.batch_size", "bn.placement"])
    with_bn, no_bn = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    fig, axes = _new(2, sharey=True)
    ax, ax1 = axes[0]
    series = [(with_bn, "val/acc", "BN, running statistics (eval mode)", "tab:red", "o", "-"),
              (with_bn, "val/acc_batch_stats", "BN, batch statistics (training mode)", "tab:blue", "^", ":"),
              (with_bn, "val/acc_precise_bn", "BN, precise BN", "tab:green", "D", "-"),
              (no_bn, "val/acc", "no BN (eval mode)", "tab:gray", "s", "--")]
    for frame, metric, label, color, marker, ls in series:
        col = FINAL + metric
        if frame.empty or col not in frame or frame[col].notna().sum() == 0:
            continue
        agg = aggregate(frame, ["data.batch_size"], col)
        _band(ax, agg["data.batch_size"], agg["mean"], _ci(agg), label, color, marker, ls)
        _seed_lines(ax, frame, "data.batch_size", col, color)
    for k, (pl, frame) in enumerate(runs.groupby("bn.placement")):
        _x_diverged(ax, frame, "data.batch_size", PLACEMENT_COLOR.get(pl, "k"), PLACEMENT_LABEL.get(pl, pl),
                    jitter=1.12 ** k, row=k)
    col = FINAL + "val/acc_batch_stats_bs1"
    if col in with_bn and with_bn[col].notna().any():
        agg = aggregate(with_bn, ["data.batch_size"], col)
        _band(ax1, agg["data.batch_size"], agg["mean"], _ci(agg),
              "BN, batch statistics of ONE example (train mode, batch size 1 at test)", "tab:purple", "v", "-")
    else:
        ax1.text(0.5, 0.5, "val/acc_batch_stats_bs1 not logged", ha="center", transform=ax1.transAxes)
    bss = sorted(ok["data.batch_size"].unique())
    for a in (ax, ax1):
        _chance(a)
        _log_ticks(a, bss, base=2)
        a.set_xlabel("training batch size (examples, log2)")
        a.set_ylim(0, 1.02)
    ax.set_ylabel("final val/acc")
    ax.set_title("test with running / batch / precise statistics", fontsize=9)
    ax1.set_title("test in training mode, one example per batch", fontsize=9)
    return _finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


def _variant(placement: str) -> str:
    return "without BN" if placement == "none" else f"with BN ({placement})"


# A run "learns" when its loss stayed finite and its final training accuracy is at least twice
# chance: a finite loss alone also counts runs that sit at chance for good (dead ReLUs, saturated
# sigmoids), which are no more converged than a NaN.
LEARNED = 2 * CHANCE


def learned(runs: pd.DataFrame) -> pd.Series:
    """Per run: not diverged and final train/acc >= LEARNED (False where train/acc is missing)."""
    acc = runs[FINAL + "train/acc"] if FINAL + "train/acc" in runs else pd.Series(np.nan, index=runs.index)
    return ~runs["diverged"].astype(bool) & (acc.astype(float) >= LEARNED)


def convergence_regions(runs: pd.DataFrame, xcol: str = "optim.lr") -> Dict[str, List[Tuple[float, float]]]:
    """Per bn.placement: maximal runs of consecutive x values (sorted) where every finished run
    learned (see `learned`), as (low, high) pairs."""
    fin = runs[runs["status"].eq("FINISHED")]
    out: Dict[str, List[Tuple[float, float]]] = {}
    fin = fin.assign(_learned=learned(fin))
    for pl, g in fin.groupby("bn.placement"):
        per = g.groupby(xcol)["_learned"].all().sort_index()
        regions, start, prev = [], None, None
        for x, good in per.items():
            if good and start is None:
                start = x
            if not good and start is not None:
                regions.append((start, prev))
                start = None
            prev = x
        if start is not None:
            regions.append((start, prev))
        out[str(pl)] = regions
    return out


def fig_lr(runs: pd.DataFrame) -> Figure:
    """Final eval-mode val/acc vs the SGD learning rate (log axis), with and without BN, mean and
    95% CI over the seeds that converged; an 'x' at the chance line (with the count) where runs
    diverged, and bars above the plot spanning the learning rates where every seed learned (finite
    loss and final train/acc at least twice chance)."""
    title = "Learning rate: BN widens the region of convergence"
    fin = runs[runs["status"].eq("FINISHED")] if not runs.empty else runs
    notes = _notes(runs, "marked x at chance (count below)")
    if fin.empty or "optim.lr" not in fin:
        return _empty(title, "no finished runs", notes)
    ok = fin[~fin["diverged"].astype(bool)]
    pooled = varying(fin, exclude=["optim.lr", "bn.placement"])
    fig, axes = _new(1, width=6.5, height=4.4)
    ax = axes[0, 0]
    placements = [p for p in ["before_act", "after_act", "none"] if p in set(fin["bn.placement"])]
    placements += sorted(set(fin["bn.placement"]) - set(placements))
    regions = convergence_regions(fin)
    for k, pl in enumerate(placements):
        color = PLACEMENT_COLOR.get(pl, COLORS[k % len(COLORS)])
        agg = aggregate(ok[ok["bn.placement"] == pl], ["optim.lr"], FINAL + "val/acc")
        if not agg.empty:
            _band(ax, agg["optim.lr"], agg["mean"], _ci(agg), _variant(pl), color)
            _seed_lines(ax, ok[ok["bn.placement"] == pl], "optim.lr", FINAL + "val/acc", color)
        _x_diverged(ax, fin[fin["bn.placement"] == pl], "optim.lr", color, _variant(pl), jitter=1.12 ** k, row=k)
        y = 1.04 + 0.035 * k
        for lo, hi in regions.get(pl, []):
            ax.plot([lo, hi], [y, y], lw=5, color=color, alpha=0.5, solid_capstyle="butt",
                    label=f"all seeds learn: {_variant(pl)}")
    _chance(ax)
    _log_ticks(ax, sorted(fin["optim.lr"].unique()))
    ax.set_ylim(0, 1.04 + 0.035 * len(placements) + 0.02)
    ax.set_xlabel("optim.lr (SGD learning rate, log)")
    ax.set_ylabel("final val/acc, eval mode")
    notes.append(f"bars: every seed learns (finite loss, final train/acc >= {LEARNED:g})")
    return _finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


def fig_placement(runs: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """BN before the activation vs after it vs no BN, one column per activation: val/acc per epoch
    (top; mean and 95% CI over seeds) and final val/acc as bars with the 95% CI and n (bottom)."""
    title = "Where BN sits: before vs after the activation vs no BN, per activation"
    ok, _, _ = split_runs(runs)
    okc = _usable_curves(curves)
    notes = _notes(runs, "left out of the means")
    if ok.empty or "model.activation" not in ok:
        return _empty(title, "no finished runs", notes)
    acts = sorted(ok["model.activation"].unique())
    pls = [p for p in ["before_act", "after_act", "none"] if p in set(ok["bn.placement"])]
    fig, axes = _new(len(acts), 2, height=3.3, sharey="row")
    for j, act in enumerate(acts):
        top, bottom = axes[0, j], axes[1, j]
        for k, pl in enumerate(pls):
            color = PLACEMENT_COLOR[pl]
            c = okc[(okc["model.activation"] == act) & (okc["bn.placement"] == pl) & (okc["metric"] == "val/acc")]
            agg = aggregate(c, ["step"], "value")
            if not agg.empty:
                _band(top, agg["step"], agg["mean"], _ci(agg), PLACEMENT_LABEL[pl], color)
                _seed_lines(top, c, "step", "value", color, by="run_id")
            vals = ok.loc[(ok["model.activation"] == act) & (ok["bn.placement"] == pl), FINAL + "val/acc"]
            m, lo, hi, n = interval(vals, FINAL + "val/acc")
            if n:
                err = _yerr(m, lo, hi)
                bottom.bar(k, m, color=color, yerr=err, capsize=4, alpha=0.85)
                label = f"{m:.3f}" + (f"\n[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "") + f"\nn={n}"
                if m >= 0.3:  # inside a tall bar, above the error bar's top for a short one
                    bottom.text(k, m / 2, label, ha="center", va="center", fontsize=7, color="white")
                else:
                    top_of = (hi if np.isfinite(hi) else m) + 0.02
                    bottom.text(k, top_of, label, ha="center", va="bottom", fontsize=7, color="black")
        top.set_title(f"model.activation={act}", fontsize=9)
        _epoch_axis(top)
        _chance(top)
        bottom.set_xticks(range(len(pls)), [PLACEMENT_LABEL[p] for p in pls], fontsize=7)
        bottom.set_ylim(0, 1.1)
        _chance(bottom, label=False)
    axes[0, 0].set_ylabel("val/acc, eval mode")
    axes[1, 0].set_ylabel("final val/acc")
    return _finish(fig, title, notes)


SHADOW_STATS = ("bnstats/mean_err_shadow/", "bnstats/var_err_shadow/")


def shadow_stat_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Curves of bnstats/{mean,var}_err_shadow/<m> -> rows of metric bnstats/{mean,var}_err with
    bn.momentum = m (a run's shadow average with momentum m is what a run with bn.momentum=m would
    hold, since momentum does not change training). Empty when no run logged shadow statistics."""
    parts = []
    for prefix in SHADOW_STATS:
        sub = curves[curves["metric"].str.startswith(prefix)]
        if sub.empty:
            continue
        m = sub["metric"].str[len(prefix):].astype(float)
        # run_id per (run, momentum): each shadow is a run of its own for aggregation.
        parts.append(sub.assign(metric=prefix.split("_shadow/")[0], **{"bn.momentum": m.values},
                                run_id=sub["run_id"] + "@" + m.astype(str)))
    return pd.concat(parts, ignore_index=True) if parts else curves.iloc[0:0]


def running_stats_curves(curves: pd.DataFrame) -> Tuple[pd.DataFrame, List[str], bool]:
    """The usable curves that the running-statistics figure draws and its caption quotes, notes
    on where they come from, and whether they are shadow averages. Where runs logged shadow
    statistics, those (one series per momentum) at the largest batch size: the fewest steps per
    epoch, where a small momentum stays stale longest."""
    ok = _usable_curves(curves)
    shadows = shadow_stat_curves(ok) if not ok.empty else ok
    if shadows.empty:
        return ok, [], False
    notes = []
    if "data.batch_size" in shadows and shadows["data.batch_size"].nunique() > 1:
        bs = shadows["data.batch_size"].max()
        shadows = shadows[shadows["data.batch_size"] == bs]
        notes.append(f"batch size {bs}; other batch sizes in the study's summary.csv")
    notes.append("momenta from shadow running averages of the same runs (bnstats/*_shadow/<m>)")
    return shadows, notes, True


def fig_running_stats(curves: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> Figure:
    """How far the running mean and variance are from the precise-BN population statistics, per
    epoch (bnstats/mean_err, bnstats/var_err: mean relative distance over BN layers; log axis),
    one line per configuration (bn.momentum, batch size, ... whatever varies), mean and 95% CI.
    `runs` (optional) lets the footnote also count runs that logged no point at all."""
    title = "Running vs population statistics: small momentum (or no updates) keeps them stale"
    ok, shadow_notes, from_shadows = running_stats_curves(curves)
    notes = _notes(curves if runs is None else runs, "not averaged") + shadow_notes
    ok = ok[ok["metric"].isin(["bnstats/mean_err", "bnstats/var_err"])] if not ok.empty else ok
    if ok.empty:
        return _empty(title, "no bnstats/* metrics logged", notes)
    groups = ["bn.momentum"] if from_shadows else varying(ok.drop_duplicates("run_id"))
    fig, axes = _new(2, sharey=False)
    for ax, metric, label in [(axes[0, 0], "bnstats/mean_err", "running mean"),
                              (axes[0, 1], "bnstats/var_err", "running variance")]:
        sub = ok[ok["metric"] == metric]
        if not sub.empty and (sub["value"] > 0).any():
            _curve_groups(ax, sub, metric, groups, log=True)
            ax.set_yscale("log")
        ax.set_title(f"{metric}: {label}", fontsize=9)
        ax.set_ylabel("relative distance to precise BN (log;\ngeometric mean, 95% CI)")
        _epoch_axis(ax)
    return _finish(fig, title, notes)


def fig_curves(curves: pd.DataFrame, metrics: Sequence[str] = ("train/acc", "val/acc"),
               title: str = "Training curves: accuracy per epoch", runs: Optional[pd.DataFrame] = None) -> Figure:
    """A generic figure: each metric per epoch (one panel per metric), one line per configuration
    (the params that vary, seeds averaged: mean and 95% CI). `runs` (optional) lets the footnote
    also count runs that logged no point at all."""
    ok = _usable_curves(curves)
    notes = _notes(curves if runs is None else runs, "not averaged")
    present = [m for m in metrics if not ok.empty and (ok["metric"] == m).any()]
    if not present:
        return _empty(title, "no finished runs with " + ", ".join(metrics), notes)
    groups = varying(ok.drop_duplicates("run_id"))
    fig, axes = _new(len(present), sharey=all(m.endswith("acc") for m in present))
    for ax, metric in zip(axes[0], present):
        _curve_groups(ax, ok, metric, groups)
        ax.set_title(metric, fontsize=9)
        ax.set_ylabel(ACC if metric.endswith("acc") else metric)
        _epoch_axis(ax)
    n = ok["run_id"].nunique()
    notes.append(f"{n} run(s)")
    return _finish(fig, title, notes)


# ------------------------------------------------------------------------------ dynamics studies

STEP = "step/"
D2L_REPORTED = {"from-scratch BN (seed 004)": 0.878, "framework BN (seed 004)": 0.796}


def step_wide(curves: pd.DataFrame) -> pd.DataFrame:
    """Step-level metrics (step/<metric>, MLflow step = global SGD step) of the usable runs as one
    row per (run, step) with a column per metric (prefix kept), plus seed and bn.momentum."""
    ok = _usable_curves(curves)
    sub = ok[ok["metric"].str.startswith(STEP)] if not ok.empty else ok
    if sub.empty:
        return pd.DataFrame()
    wide = sub.pivot_table(index=["run_id", "step"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    meta = [c for c in ("seed", "bn.momentum") if c in sub]
    return wide.merge(sub.drop_duplicates("run_id")[["run_id", *meta]], on="run_id", how="left")


def _shadow_cols(wide: pd.DataFrame, prefix: str = STEP + "val/acc_shadow/") -> Dict[float, str]:
    return {float(c[len(prefix):]): c for c in wide.columns if c.startswith(prefix)}


def _lr_changes(wide: pd.DataFrame) -> List[float]:
    """Global steps at which the scheduled learning rate changed (from step/lr)."""
    if STEP + "lr" not in wide:
        return []
    lr = wide.groupby("step")[STEP + "lr"].mean().sort_index()
    return [float(s) for s, a, b in zip(lr.index[1:], lr.to_numpy()[:-1], lr.to_numpy()[1:]) if not np.isclose(a, b)]


def ema_gaps(wide: pd.DataFrame) -> pd.DataFrame:
    """Per run and step: precise-BN accuracy minus EMA accuracy for each momentum (the run's own
    bn.momentum: step/val/acc; shadows: step/val/acc_shadow/<m>). Columns run_id, seed, step,
    momentum, gap, lr."""
    if wide.empty or STEP + "val/acc_precise_bn" not in wide:
        return pd.DataFrame(columns=["run_id", "seed", "step", "momentum", "gap", "lr"])
    parts = []
    own = wide["bn.momentum"] if "bn.momentum" in wide else pd.Series(np.nan, index=wide.index)
    cols = {**{m: c for m, c in _shadow_cols(wide).items()}}
    for m, c in [(None, STEP + "val/acc"), *sorted(cols.items())]:
        if c not in wide:
            continue
        mom = own if m is None else pd.Series(m, index=wide.index)
        parts.append(pd.DataFrame({"run_id": wide["run_id"], "seed": wide.get("seed"), "step": wide["step"],
                                   "momentum": mom.astype(float),
                                   "gap": wide[STEP + "val/acc_precise_bn"] - wide[c],
                                   "lr": wide.get(STEP + "lr", pd.Series(np.nan, index=wide.index))}))
    out = pd.concat(parts, ignore_index=True)
    return out.drop_duplicates(["run_id", "step", "momentum"])


def fig_ema_vs_precise(curves: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> Figure:
    """Step-level validation accuracy through a run with a step decay of the learning rate: EMA
    running statistics at several momenta (the run's own and its shadows) against precise BN and
    batch statistics (top); the gap precise − EMA per momentum, with the learning rate (bottom).
    Mean and 95% band over seeds; each seed thin where n <= 5."""
    title = "EMA vs precise BN during training: stale EMA statistics while the learning rate is high"
    notes = _notes(curves if runs is None else runs, "not averaged")
    wide = step_wide(curves)
    if wide.empty or STEP + "val/acc" not in wide:
        return _empty(title, "no step-level metrics (train.eval_every) logged", notes)
    fig, axes = _new(1, 2, width=8.0, height=3.4, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    own = wide["bn.momentum"].dropna().unique() if "bn.momentum" in wide else []
    series = [(STEP + "val/acc_precise_bn", "precise BN (population statistics)", "tab:green", "-")]
    series += [(STEP + "val/acc_batch_stats", "batch statistics", "tab:blue", ":")]
    moms = {float(own[0]) if len(own) == 1 else float("nan"): STEP + "val/acc", **_shadow_cols(wide)}
    ordered = sorted(moms.items(), key=lambda kv: -kv[0] if np.isfinite(kv[0]) else 0)
    cmap = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    colors = {m: cmap[i % len(cmap)] for i, (m, _) in enumerate(ordered)}
    series += [(c, f"EMA, momentum {m:g}", colors[m], "-") for m, c in ordered]
    main = {STEP + "val/acc_precise_bn", STEP + "val/acc"}
    for col, label, color, ls in series:
        if col not in wide:
            continue
        long = wide[["run_id", "seed", "step", col]].dropna().assign(metric=col.replace(STEP, ""))
        agg = aggregate(long, ["step"], col)
        # Bands and seed lines only for precise BN and the run's own EMA: eight bands hide each other.
        band = _ci(agg) if col in main else np.full(len(agg), np.nan)
        _band(top, agg["step"], agg["mean"], band, label, color, marker="", ls=ls)
        if col in main:
            _seed_lines(top, long, "step", col, color, by="run_id")
    top.set_ylabel("val/acc on the step-level subset")
    top.set_ylim(max(0.0, float(np.nanmin(wide[STEP + "val/acc"])) - 0.05), 1.0)
    gaps = ema_gaps(wide)
    for m, _ in ordered:
        g = gaps[np.isclose(gaps["momentum"], m)] if np.isfinite(m) else gaps[gaps["momentum"].isna()]
        if g.empty:
            continue
        agg = aggregate(g, ["step"], "gap")
        _band(bottom, agg["step"], agg["mean"], _ci(agg), f"_gap {m:g}", colors[m], marker="", ls="-")
    bottom.axhline(0, color="0.5", lw=0.8)
    if not gaps.empty:
        means = gaps.groupby(["momentum", "step"])["gap"].mean()
        bottom.set_ylim(min(-0.05, float(means.min()) - 0.05), float(means.max()) + 0.1)
    bottom.set_ylabel("precise BN − EMA\n(val/acc, mean and 95% CI)")
    bottom.set_xlabel("global SGD step")
    for ax in (top, bottom):
        for s in _lr_changes(wide):
            ax.axvline(s, color="0.3", ls="--", lw=0.8, label="learning-rate decay")
    if STEP + "lr" in wide:
        lr = wide.groupby("step")[STEP + "lr"].mean().sort_index()
        twin = bottom.twinx()
        twin.plot(lr.index, lr.to_numpy(), color="0.4", lw=1.2, drawstyle="steps-post", label="learning rate (right axis)")
        twin.set_yscale("log")
        twin.set_ylabel("learning rate (log)")
    n = wide["run_id"].nunique()
    notes.append(f"{n} run(s); every {int(np.diff(sorted(wide['step'].unique()))[0]) if wide['step'].nunique() > 1 else 0} steps")
    return _finish(fig, title, notes, legend_axes=fig.axes)


def precise_size_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """final/val/acc_precise_bn/<n> columns -> rows: run_id, seed, samples, acc."""
    prefix = FINAL + "val/acc_precise_bn/"
    parts = []
    for c in runs.columns:
        if c.startswith(prefix):
            parts.append(pd.DataFrame({"run_id": runs["run_id"], "seed": runs.get("seed"),
                                       "samples": float(c[len(prefix):]), "acc": runs[c]}))
    if not parts:
        return pd.DataFrame(columns=["run_id", "seed", "samples", "acc"])
    return pd.concat(parts, ignore_index=True).dropna(subset=["acc"])


def fig_precise_samples(runs: pd.DataFrame) -> Figure:
    """Precise-BN val/acc against the number of calibration samples (log axis), every size
    evaluated on the same weights at the last epoch; the EMA (running statistics) and batch
    statistics of the same runs as horizontal bands; Wu & Johnson's 10^3-10^4 shaded."""
    title = "Precise BN: how many calibration samples are enough?"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "not averaged")
    rows = precise_size_rows(ok)
    if rows.empty:
        return _empty(title, "no val/acc_precise_bn/<n> metrics (bn.precise_sizes) logged", notes)
    rows = rows.assign(**{"final/val/acc_precise_bn": rows["acc"]})
    fig, axes = _new(2, width=5.2, height=4.2)
    ax, ax1 = axes[0]
    # Right: per seed, the accuracy at n samples minus that with the most samples (paired: the
    # seeds' own spread, which dominates the left panel, cancels).
    full = rows[rows["samples"] == rows["samples"].max()].set_index("run_id")["acc"]
    rows = rows.assign(gap=rows["acc"] - rows["run_id"].map(full))
    gap = aggregate(rows, ["samples"], "gap")
    _band(ax1, gap["samples"], gap["mean"], _ci(gap), "_gap", "tab:green", marker="D")
    _seed_lines(ax1, rows, "samples", "gap", "tab:green")
    ax1.axhline(0, color="0.5", lw=0.8)
    ax1.axvspan(1e3, 1e4, color="0.85", zorder=0)
    _log_ticks(ax1, sorted(rows["samples"].unique()))
    ax1.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax1.set_xlabel("calibration samples (training examples, log)")
    ax1.set_ylabel(f"val/acc − val/acc with {int(rows['samples'].max())} samples\n(per seed; mean ± 95% CI)")
    ax1.set_title("paired with the largest calibration set", fontsize=9)
    agg = aggregate(rows, ["samples"], "final/val/acc_precise_bn")
    _band(ax, agg["samples"], agg["mean"], _ci(agg), "precise BN (val/acc)", "tab:green", marker="D")
    _seed_lines(ax, rows, "samples", "acc", "tab:green")
    xs = sorted(rows["samples"].unique())
    for col, label, color, ls in ((FINAL + "val/acc", "EMA running statistics (momentum 0.1)", "tab:red", "-"),
                                  (FINAL + "val/acc_batch_stats", "batch statistics", "tab:blue", ":")):
        if col in ok and ok[col].notna().any():
            m, lo, hi, _ = interval(ok[col], col)
            ax.axhline(m, color=color, ls=ls, lw=1.2, label=label)
            if np.isfinite(lo):  # the interval as two thin lines: a filled span would hide the curve
                for edge in (lo, hi):
                    ax.axhline(edge, color=color, ls=(0, (1, 3)), lw=0.8, label="_interval")
    ax.axvspan(1e3, 1e4, color="0.85", zorder=0, label="Wu & Johnson 2021: 10^3-10^4 suffice")
    _log_ticks(ax, xs)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.set_xlabel("calibration samples (training examples, log)")
    ax.set_ylabel("final val/acc")
    lo = float(np.nanmin(agg["lo"])) if agg["lo"].notna().any() else float(agg["mean"].min())
    ax.set_ylim(max(0.0, min(lo, agg["mean"].min()) - 0.03), min(1.0, float(agg["hi"].max()) + 0.02))
    notes.append("dotted thin lines: 95% intervals of the EMA and batch-statistics accuracies")
    notes.append(f"n={int(agg['n'].max())} seeds; every size on the same weights, a fresh draw of batches of "
                 f"{int(ok['data.batch_size'].iloc[0]) if 'data.batch_size' in ok else '?'}")
    return _finish(fig, title, notes)


def norm_batch_size(runs: pd.DataFrame) -> pd.Series:
    """The normalisation batch of each run: bn.ghost_batch_size, or the SGD batch where null."""
    g = runs["bn.ghost_batch_size"] if "bn.ghost_batch_size" in runs else pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(g, errors="coerce").astype(float).fillna(runs["data.batch_size"].astype(float))


def _frozen(runs: pd.DataFrame) -> pd.Series:
    f = runs["bn.freeze_at"] if "bn.freeze_at" in runs else pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(f, errors="coerce").notna()


def fig_norm_batch(runs: pd.DataFrame) -> Figure:
    """Normalisation (ghost) batch size at a fixed SGD batch (log2 axis), Wu & Johnson's three
    curves: train/acc with mini-batch statistics, val/acc with mini-batch statistics (per ghost
    batch) and with population statistics (precise BN; EMA dotted). Right: FrozenBN (the last
    epoch with frozen population statistics) against ordinary BN, both with population statistics."""
    title = "Normalisation batch size: mini-batch vs population statistics, and FrozenBN"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "marked x at chance")
    if ok.empty or "data.batch_size" not in ok:
        return _empty(title, "no finished runs", notes)
    ok = ok.assign(_norm=norm_batch_size(ok), _frozen=_frozen(ok))
    plain, frozen = ok[~ok["_frozen"]], ok[ok["_frozen"]]
    fig, axes = _new(2 if not frozen.empty else 1, sharey=True)
    ax = axes[0, 0]
    series = [(plain, FINAL + "train/acc", "train/acc, mini-batch statistics", "black", "s", "--"),
              (plain, FINAL + "val/acc_batch_stats", "val/acc, mini-batch statistics", "tab:blue", "^", ":"),
              (plain, FINAL + "val/acc_precise_bn", "val/acc, population statistics (precise BN)", "tab:green", "D", "-"),
              (plain, FINAL + "val/acc", "val/acc, EMA running statistics", "tab:red", "o", "-")]
    for frame, col, label, color, marker, ls in series:
        if frame.empty or col not in frame or frame[col].notna().sum() == 0:
            continue
        agg = aggregate(frame, ["_norm"], col)
        _band(ax, agg["_norm"], agg["mean"], _ci(agg), label, color, marker, ls)
        _seed_lines(ax, frame, "_norm", col, color)
    ax.set_title("ordinary BN (mini-batch statistics in training)", fontsize=9)
    if not frozen.empty:
        ax1 = axes[0, 1]
        for frame, col, label, color, marker, ls in (
                (frozen, FINAL + "val/acc", "FrozenBN: val/acc, population statistics", "tab:purple", "v", "-"),
                (frozen, FINAL + "train/acc", "FrozenBN: train/acc (last epoch frozen)", "tab:gray", "s", "--"),
                (plain, FINAL + "val/acc_precise_bn", "ordinary BN: val/acc, population statistics (precise BN)",
                 "tab:green", "D", "-")):
            if col in frame and frame[col].notna().any():
                agg = aggregate(frame, ["_norm"], col)
                _band(ax1, agg["_norm"], agg["mean"], _ci(agg), label, color, marker, ls)
                _seed_lines(ax1, frame, "_norm", col, color)
        ep = int(pd.to_numeric(frozen["bn.freeze_at"]).iloc[0])
        ax1.set_title(f"FrozenBN from epoch {ep} (bn.freeze_at={ep})", fontsize=9)
    sizes = sorted(ok["_norm"].unique())
    for a in axes[0]:
        _chance(a)
        _log_ticks(a, sizes, base=2)
        a.set_xlabel(f"normalisation batch (ghost batch; SGD batch {int(ok['data.batch_size'].iloc[0])}, log2)")
        a.set_ylim(0, 1.02)
    ax.set_ylabel("final accuracy")
    return _finish(fig, title, notes)


def fig_gamma_beta(runs: pd.DataFrame) -> Figure:
    """Learned gamma and beta (bn.affine=true) against fixed gamma=1, beta=0, per activation:
    final val/acc (bars, 95% interval, n) and final train/acc (black marks); seeds as dots."""
    title = "Learned vs fixed gamma and beta, sigmoid and ReLU"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "left out of the means")
    if ok.empty or "bn.affine" not in ok or "model.activation" not in ok:
        return _empty(title, "no finished runs", notes)
    acts = sorted(ok["model.activation"].unique())
    fig, axes = _new(len(acts), width=3.6, height=4.0, sharey=True)
    for ax, act in zip(axes[0], acts):
        for k, (aff, color) in enumerate(((True, "tab:blue"), (False, "tab:orange"))):
            s = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == aff)]
            if s.empty:
                continue
            m, lo, hi, n = interval(s[FINAL + "val/acc"], FINAL + "val/acc")
            err = _yerr(m, lo, hi)
            label = "learned gamma, beta (bn.affine=true)" if aff else "fixed gamma=1, beta=0 (bn.affine=false)"
            ax.bar(k, m, color=color, yerr=err, capsize=4, alpha=0.8, label=label)
            ax.plot([k] * n, s[FINAL + "val/acc"], "o", color="k", ms=3, alpha=0.6, label="_seed")
            if FINAL + "train/acc" in s:
                tm = float(s[FINAL + "train/acc"].mean())
                ax.plot([k - 0.35, k + 0.35], [tm, tm], color="k", lw=2, label="mean final train/acc")
            txt = f"{m:.3f}" + (f"\n[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "") + f"\nn={n}"
            ax.text(k, m / 2, txt, ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks([0, 1], ["learned", "fixed"])
        ax.set_title(f"model.activation={act}", fontsize=9)
        ax.set_ylim(0, 1.02)
        _chance(ax)
    axes[0, 0].set_ylabel("final val/acc (bars) and train/acc (black)")
    return _finish(fig, title, notes)


def fig_d2l_spread(runs: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """Seed 004's two numbers against bnlab's spread: final val/acc of every seed with running
    (EMA), precise and batch statistics (left), and val/acc per epoch of every seed with running
    and precise statistics (right): how far one run's last-epoch number moves."""
    title = "Dive into Deep Learning 7.5: seed 004's 0.878 and 0.796 against the spread over seeds and epochs"
    ok, _, _ = split_runs(runs)
    notes = _notes(runs, "not averaged")
    if ok.empty or FINAL + "val/acc" not in ok:
        return _empty(title, "no finished runs", notes)
    fig, axes = _new(2, width=5.0, height=4.2, sharey=True)
    ax, ax1 = axes[0]
    cols = [(FINAL + "val/acc", "running (EMA) statistics", "tab:red"),
            (FINAL + "val/acc_precise_bn", "precise BN", "tab:green"),
            (FINAL + "val/acc_batch_stats", "batch statistics", "tab:blue")]
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    for k, (col, label, color) in enumerate(cols):
        if col not in ok:
            continue
        v = ok[col].dropna().to_numpy(float)
        ax.plot(k + rng.uniform(-0.12, 0.12, len(v)), v, "o", color=color, ms=5, alpha=0.8, label=f"final val/acc, {label}")
        m, lo, hi, n = interval(ok[col], col)
        ax.errorbar([k + 0.3], [m], yerr=_yerr(m, lo, hi), fmt="_", color="k",
                    capsize=4, ms=12, label="_mean")
    for (name, v), ls in zip(D2L_REPORTED.items(), ("--", "-.")):
        for a in (ax, ax1):
            a.axhline(v, color="0.3", ls=ls, lw=1, label=f"{name}: test acc {v}")
    ax.set_xticks(range(len(cols)), ["running", "precise", "batch"])
    ax.set_title(f"final epoch, n={len(ok)} seeds (dot = seed; bar = mean, 95% CI)", fontsize=9)
    ax.set_ylabel("val/acc")
    okc = _usable_curves(curves)
    for metric, color in (("val/acc", "tab:red"), ("val/acc_precise_bn", "tab:green")):
        sub = okc[okc["metric"] == metric] if not okc.empty else okc
        for rid, g in sub.groupby("run_id"):
            g = g.sort_values("step")
            ax1.plot(g["step"], g["value"], color=color, lw=0.7, alpha=0.6, label=f"_{metric}")
    ax1.plot([], [], color="tab:red", lw=0.7, label="val/acc per epoch, running statistics (one line per seed)")
    ax1.plot([], [], color="tab:green", lw=0.7, label="val/acc per epoch, precise BN (one line per seed)")
    _epoch_axis(ax1)
    ax1.set_title("every seed, every epoch", fontsize=9)
    lo = float(np.nanmin([ok[c].min() for c, _, _ in cols if c in ok]))
    ax.set_ylim(max(0.0, min(lo, 0.79) - 0.03), 0.95)
    return _finish(fig, title, notes)

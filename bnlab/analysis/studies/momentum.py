"""momentum: the BN running-average momentum (PyTorch's convention; TF/Keras decay = 1 - momentum)
against eval-mode accuracy and the train-val gap, per batch size, with every run's shadow averages
as extra momenta (shadow_rows, computed once)."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import RUNNING_STATS, Claim, FigureSpec, Prepared, Study, register


def shadow_momenta(runs: pd.DataFrame) -> List[float]:
    return sorted(float(c[len(fr.SHADOW):]) for c in runs.columns if c.startswith(fr.SHADOW))


def shadow_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with val/acc_shadow/<m> metrics -> one row per effective momentum: the run's own row
    (momentum_source 'run') plus, per shadow m, a copy with bn.momentum = m, final/val/acc = the
    shadow's accuracy and final/gap/acc = final/train/acc - it (momentum does not change training,
    so the train accuracy is shared). A shadow equal to the run's own momentum is not duplicated."""
    base = runs.assign(momentum_source="run")
    parts = [base]
    for m in shadow_momenta(runs):
        col = f"{fr.SHADOW}{m:g}"
        if col not in runs:  # the metric name is f"{m:g}"; the parsed float prints the same
            col = next(c for c in runs.columns if c.startswith(fr.SHADOW) and float(c[len(fr.SHADOW):]) == m)
        has = runs[col].notna() & ~np.isclose(runs["bn.momentum"].astype(float).fillna(-1.0), m)
        if not has.any():
            continue
        s = runs[has].copy()
        s["bn.momentum"] = m
        s[fr.FINAL + "val/acc"] = s[col]
        if fr.FINAL + "train/acc" in s:
            s[fr.FINAL + "gap/acc"] = s[fr.FINAL + "train/acc"] - s[col]
        s["momentum_source"] = "shadow"
        parts.append(s)
    return pd.concat(parts, ignore_index=True)


_SPECIAL = [(0, "0\nnever\nupdated", lambda s: s.eq(0)), (1, "None\ncumu-\nlative", lambda s: s.isna())]


def _special_axis(ax, pts: pd.DataFrame, value: str, bsizes, colors, diverged: pd.DataFrame):
    """Momentum 0 (statistics never move) and None (cumulative average) cannot sit on a log axis:
    they get their own categorical panel left of the break."""
    ax.set_label("special-momenta")
    cats = _SPECIAL
    for x, _, sel in cats:
        k = int(sel(diverged["bn.momentum"]).sum()) if not diverged.empty else 0
        if k and value == fr.FINAL + "val/acc":
            ax.plot([x], [fr.CHANCE], "x", color="k", ms=9, mew=2, label="diverged: run (x, count)")
            ax.annotate(str(k), (x, fr.CHANCE), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    for i, b in enumerate(bsizes):
        sub = pts[pts["data.batch_size"] == b]
        for x, _, sel in cats:
            s = sub[sel(sub["bn.momentum"])]
            if s.empty:
                continue
            m, lo, hi, n = S.interval(s[value], value)
            err = P.yerr(m, lo, hi)
            ax.errorbar([x + (i - (len(bsizes) - 1) / 2) * 0.12], [m], yerr=err,
                        fmt="o", color=colors[i], ms=5, capsize=3, label=f"_special {b}")
    ax.set_xticks([x for x, _, _ in cats], [lab for _, lab, _ in cats], fontsize=7)
    ax.set_xlim(-0.6, 1.6)
    ax.spines["right"].set_visible(False)


def _break_marks(ax_left, ax_right):
    kw = dict(marker=[(-1, -1), (1, 1)], markersize=8, linestyle="none", color="k", mec="k", mew=1, clip_on=False)
    ax_left.plot([1, 1], [0, 1], transform=ax_left.transAxes, **kw)
    ax_right.plot([0, 0], [0, 1], transform=ax_right.transAxes, **kw)


def fig_momentum(runs: pd.DataFrame, shadows: bool = True, pts: Optional[pd.DataFrame] = None) -> Figure:
    """Final eval-mode val/acc and the train-val gap vs BN momentum (PyTorch convention, log axis;
    TF/Keras decay = 1 - momentum on the top axis), one line per training batch size, mean and 95%
    CI over seeds. Momentum 0 (never updated) and None (cumulative) sit in a panel left of the
    break. With shadows=True, every val/acc_shadow/<m> metric of a run is a point at momentum m."""
    title = "BN momentum: too small a momentum leaves stale statistics (low eval-mode val/acc, large gap)"
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "marked x at chance")
    if ok.empty or "bn.momentum" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    if pts is None or not shadows:
        pts = shadow_rows(ok) if shadows else ok.assign(momentum_source="run")
    if shadows and (pts["momentum_source"] == "shadow").any():
        notes.append("points from shadow running averages (val/acc_shadow/<m>) of the same runs")
    bsizes = sorted(pts["data.batch_size"].dropna().unique())
    colors = [P.COLORS[i % len(P.COLORS)] for i in range(len(bsizes))]
    fig = Figure(figsize=(9.5, 7.2), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 5], wspace=0.02)
    rows = [(fr.FINAL + "val/acc", "final val/acc, eval mode"), (fr.FINAL + "gap/acc", "gap = train/acc − val/acc")]
    positive = sorted(m for m in pts["bn.momentum"].dropna().unique() if m > 0)
    diverged = runs[runs["status"].eq("FINISHED") & runs["diverged"].astype(bool)]
    for r, (value, ylabel) in enumerate(rows):
        ax = fig.add_subplot(gs[r, 1])
        axl = fig.add_subplot(gs[r, 0], sharey=ax)
        if value not in pts:
            continue
        for i, b in enumerate(bsizes):
            sub = pts[(pts["data.batch_size"] == b) & (pts["bn.momentum"] > 0)]
            agg = S.aggregate(sub, ["bn.momentum"], value)
            n = S.aggregate(pts[pts["data.batch_size"] == b], ["bn.momentum"], value)["n"]
            seeds = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}–{n.max()}"
            if not agg.empty:
                P.band(ax, agg["bn.momentum"], agg["mean"], P.band_of(agg), f"batch size {b:g} ({seeds} seeds per point)",
                      colors[i])
                P.seed_lines(ax, sub, "bn.momentum", value, colors[i])
        _special_axis(axl, pts, value, bsizes, colors, diverged)
        if r == 0:
            P.chance_line(ax)
            P.mark_diverged(ax, diverged[diverged["bn.momentum"] > 0], "bn.momentum", "k", "run (x, count)")
        if positive:
            P.log_ticks(ax, positive)
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
    return P.finish(fig, title, notes)


def momentum_order(values: Iterable[float]) -> List[float]:
    """0 first, positive momenta ascending, None (cumulative, NaN) last."""
    vals = list(values)
    nan = [v for v in vals if v is None or (isinstance(v, float) and math.isnan(v))]
    real = sorted({float(v) for v in vals if not (v is None or (isinstance(v, float) and math.isnan(v)))})
    return real + ([float("nan")] if nan else [])


def fig_momentum_heatmap(runs: pd.DataFrame, value: str = fr.FINAL + "gap/acc", shadows: bool = True,
                         pts: Optional[pd.DataFrame] = None) -> Figure:
    """Heatmap of the train-val gap (default; any final/ metric via `value`) over BN momentum
    (rows, with the TF/Keras decay) x training batch size (columns): mean over seeds, with the
    mean, 95% CI and n written in each cell."""
    title = "Train−val gap by BN momentum and batch size: the gap grows where statistics are stale"
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "left out of the means")
    if ok.empty or "bn.momentum" not in ok or value not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    if pts is None or not shadows:
        pts = shadow_rows(ok) if shadows else ok
    agg = S.aggregate(pts, ["bn.momentum", "data.batch_size"], value)
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
    ax.set_yticks(range(len(moms)), [fr.momentum_label(m) for m in moms], fontsize=8)
    ax.set_xlabel("training batch size (examples)")
    ax.set_ylabel("bn.momentum (TF/Keras decay)")
    fig.colorbar(im, ax=ax, label=value.replace(fr.FINAL, "final ") + (" (train/acc − val/acc)" if "gap" in value else ""))
    return P.finish(fig, title, notes)


def caption_momentum(data: Prepared) -> str:
    ok = data.ok
    if ok.empty:
        return "No finished runs."
    pts = data.pts
    parts = []
    for b in sorted(pts["data.batch_size"].unique()):
        sub = pts[pts["data.batch_size"] == b]
        agg = S.aggregate(sub, ["bn.momentum"], fr.FINAL + "val/acc")
        if agg.empty:
            continue
        best, worst = agg.loc[agg["mean"].idxmax()], agg.loc[agg["mean"].idxmin()]
        txt = (f"batch size {b:g}: best val/acc {S.agg_text(best)} at momentum {fr.momentum_label(best['bn.momentum'])}, "
               f"worst {S.agg_text(worst)} at momentum {fr.momentum_label(worst['bn.momentum'])}")
        if fr.FINAL + "gap/acc" in sub:
            g = S.aggregate(sub, ["bn.momentum"], fr.FINAL + "gap/acc")
            if not g.empty:
                big = g.loc[g["mean"].idxmax()]
                txt += f"; largest gap {S.agg_text(big)} at momentum {fr.momentum_label(big['bn.momentum'])}"
        parts.append(txt)
    shadows = (pts["momentum_source"] == "shadow").any()
    src = (" Momenta other than each run's own bn.momentum come from its shadow running averages "
           "(val/acc_shadow/<m>; training is the same for every momentum).") if shadows else ""
    return "Final eval-mode accuracy per BN momentum (mean ± 95% CI over seeds): " + "; ".join(parts) + "." + src


def caption_heatmap(data: Prepared) -> str:
    ok = data.ok
    if ok.empty or fr.FINAL + "gap/acc" not in ok:
        return "No finished runs with gap/acc."
    agg = S.aggregate(data.pts, ["bn.momentum", "data.batch_size"], fr.FINAL + "gap/acc")
    hi, lo = agg.loc[agg["mean"].idxmax()], agg.loc[agg["mean"].idxmin()]
    return (f"The train−val gap is largest, {S.agg_text(hi)}, at momentum {fr.momentum_label(hi['bn.momentum'])} "
            f"and batch size {hi['data.batch_size']:g}, and smallest, {S.agg_text(lo)}, at momentum "
            f"{fr.momentum_label(lo['bn.momentum'])} and batch size {lo['data.batch_size']:g} "
            f"({len(agg)} cells).")


def claims_momentum(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty:
        return []
    pts = data.pts
    bs = pts["data.batch_size"].max()
    sub = pts[pts["data.batch_size"] == bs]

    def at(m, col=fr.FINAL + "val/acc"):
        return sub[np.isclose(sub["bn.momentum"].astype(float).fillna(-1), m)].set_index("seed")[col]

    out = []
    if len(at(0.001)) and len(at(0.1)):
        n_train = ok["data.train_subset"].dropna().iloc[0] if "data.train_subset" in ok and \
            ok["data.train_subset"].notna().any() else 60000
        steps = int(ok.loc[ok["data.batch_size"] == bs, "train.epochs"].iloc[0]) * (int(n_train) // int(bs))
        d = (at(0.1) - at(0.001)).dropna()
        gd = (at(0.001, fr.FINAL + "gap/acc") - at(0.1, fr.FINAL + "gap/acc")).dropna()
        out.append(Claim("Good training but poor validation? Lower the decay to about 0.9 (momentum 0.1): a decay "
                         "near 1 (momentum 0.001) averages too slowly (seed 000, quoting TensorFlow)",
                         f"batch {bs:g} ({steps} steps, momentum x steps = {0.001 * steps:.2f} for 0.001): val/acc "
                         f"momentum 0.1 {S.acc_text(at(0.1))} vs 0.001 {S.acc_text(at(0.001))}; paired {S.diff_text(d)}; gap/acc "
                         f"grows by {S.diff_text(gd)}",
                         V.above(d, 0.0, rule="95% CI of the paired gain above 0")))
    if len(at(1.0)) and len(at(0.1)):
        d = (at(0.1) - at(1.0)).dropna()
        out.append(Claim("Momentum 1 in PyTorch's convention (decay 0: the last batch's statistics only) is biased and "
                         "hurts validation (seed 000)",
                         f"batch {bs:g}: val/acc momentum 0.1 {S.acc_text(at(0.1))} vs 1.0 {S.acc_text(at(1.0))}; paired {S.diff_text(d)}",
                         V.above(d, 0.0, rule="95% CI of the paired gain above 0")))
    return out


def prepare(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    d = Prepared(runs, curves)
    d.pts = shadow_rows(d.ok)  # one row per (run, effective momentum)
    return d


STUDY = register(Study("momentum", prepare, figures=[
    FigureSpec("momentum", lambda d: fig_momentum(d.runs, pts=d.pts), caption_momentum),
    FigureSpec("momentum_heatmap", lambda d: fig_momentum_heatmap(d.runs, pts=d.pts), caption_heatmap),
    RUNNING_STATS], claims=claims_momentum, order=30))

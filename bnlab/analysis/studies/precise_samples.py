"""precise_samples: how many calibration samples precise BN needs (Wu & Johnson 2021, sec. 3): every
bn.precise_sizes evaluation on the same weights (the per-size rows computed once)."""
from __future__ import annotations

from typing import List

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import Claim, FigureSpec, Prepared, Study, register


def precise_size_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """final/val/acc_precise_bn/<n> columns -> rows: run_id, seed, samples, acc."""
    prefix = fr.FINAL + "val/acc_precise_bn/"
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
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "not averaged")
    rows = precise_size_rows(ok)
    if rows.empty:
        return P.empty_figure(title, "no val/acc_precise_bn/<n> metrics (bn.precise_sizes) logged", notes)
    rows = rows.assign(**{"final/val/acc_precise_bn": rows["acc"]})
    fig, axes = P.new_figure(2, width=5.2, height=4.2)
    ax, ax1 = axes[0]
    # Right: per seed, the accuracy at n samples minus that with the most samples (paired: the
    # seeds' own spread, which dominates the left panel, cancels).
    full = rows[rows["samples"] == rows["samples"].max()].set_index("run_id")["acc"]
    rows = rows.assign(gap=rows["acc"] - rows["run_id"].map(full))
    gap = S.aggregate(rows, ["samples"], "gap")
    P.band(ax1, gap["samples"], gap["mean"], P.band_of(gap), "_gap", "tab:green", marker="D")
    P.seed_lines(ax1, rows, "samples", "gap", "tab:green")
    ax1.axhline(0, color="0.5", lw=0.8)
    ax1.axvspan(1e3, 1e4, color="0.85", zorder=0)
    P.log_ticks(ax1, sorted(rows["samples"].unique()))
    ax1.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax1.set_xlabel("calibration samples (training examples, log)")
    ax1.set_ylabel(f"val/acc − val/acc with {int(rows['samples'].max())} samples\n(per seed; mean ± 95% CI)")
    ax1.set_title("paired with the largest calibration set", fontsize=9)
    agg = S.aggregate(rows, ["samples"], "final/val/acc_precise_bn")
    P.band(ax, agg["samples"], agg["mean"], P.band_of(agg), "precise BN (val/acc)", "tab:green", marker="D")
    P.seed_lines(ax, rows, "samples", "acc", "tab:green")
    xs = sorted(rows["samples"].unique())
    for col, label, color, ls in ((fr.FINAL + "val/acc", "EMA running statistics (momentum 0.1)", "tab:red", "-"),
                                  (fr.FINAL + "val/acc_batch_stats", "batch statistics", "tab:blue", ":")):
        if col in ok and ok[col].notna().any():
            m, lo, hi, _ = S.interval(ok[col], col)
            ax.axhline(m, color=color, ls=ls, lw=1.2, label=label)
            if np.isfinite(lo):  # the interval as two thin lines: a filled span would hide the curve
                for edge in (lo, hi):
                    ax.axhline(edge, color=color, ls=(0, (1, 3)), lw=0.8, label="_interval")
    ax.axvspan(1e3, 1e4, color="0.85", zorder=0, label="Wu & Johnson 2021: 10^3-10^4 suffice")
    P.log_ticks(ax, xs)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.set_xlabel("calibration samples (training examples, log)")
    ax.set_ylabel("final val/acc")
    lo = float(np.nanmin(agg["lo"])) if agg["lo"].notna().any() else float(agg["mean"].min())
    ax.set_ylim(max(0.0, min(lo, agg["mean"].min()) - 0.03), min(1.0, float(agg["hi"].max()) + 0.02))
    notes.append("dotted thin lines: 95% intervals of the EMA and batch-statistics accuracies")
    notes.append(f"n={int(agg['n'].max())} seeds; every size on the same weights, a fresh draw of batches of "
                 f"{int(ok['data.batch_size'].iloc[0]) if 'data.batch_size' in ok else '?'}")
    return P.finish(fig, title, notes)


def caption_precise_samples(data: Prepared) -> str:
    ok = data.ok
    rows = data.rows
    if rows.empty:
        return "No val/acc_precise_bn/<n> metrics."
    parts = [f"{int(n)}: {S.stat(g['acc'].rename(fr.FINAL + 'val/acc'))}" for n, g in rows.groupby("samples")]
    return ("Precise-BN val/acc by calibration samples: " + "; ".join(parts)
            + f". EMA running statistics: {S.stat(fr.final_col(ok, 'val/acc'))}.")


def claims_precise_samples(data: Prepared) -> List[Claim]:
    ok = data.ok
    rows = data.rows
    if rows.empty:
        return []
    full = rows["samples"].max()
    ref = rows[rows["samples"] == full].set_index("seed")["acc"]
    out = []

    def gap(n):
        r = rows[rows["samples"] == n].set_index("seed")["acc"]
        return (r - ref).dropna()

    mid = sorted(n for n in rows["samples"].unique() if 1e3 <= n <= 1e4)
    txt = "; ".join(f"{int(n)}: {S.diff_text(gap(n))}" for n in mid)
    within = [n for n in mid if abs(S.diff(gap(n))[0]) <= 0.005]
    out.append(Claim("10^3-10^4 calibration samples suffice for precise BN (Wu & Johnson 2021, sec. 3)",
                     f"val/acc minus val/acc with all {int(full)} samples, per seed: {txt}",
                     V.from_bool(bool(within), "some size in [10^3, 10^4] within 0.005 of the full set on average"
                                 + (f"; from {int(min(within))} samples on" if within else ""))))
    small = rows["samples"].min()
    m, lo, hi, n = S.diff(gap(small))
    out.append(Claim("Too few samples give noisy population statistics (Wu & Johnson 2021: small calibration sets "
                     "hurt)",
                     f"{int(small)} samples: {S.diff_text(gap(small))} against the full set",
                     V.below(gap(small), 0.0, rule="95% CI below 0")))
    if fr.FINAL + "val/acc" in ok:
        g = S.paired(ok, ok, fr.FINAL + "val/acc_precise_bn", fr.FINAL + "val/acc")
        out.append(Claim("Precise BN beats the EMA statistics when the weights still move fast (lr 1.0; 'BN: the "
                         "untold story', seed 003)",
                         f"precise BN ({int(ok['bn.precise_samples'].iloc[0])} samples) − EMA per seed: {S.diff_text(g)}",
                         V.above(g, 0.0, rule="95% CI above 0")))
    return out


def prepare(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    d = Prepared(runs, curves)
    d.rows = precise_size_rows(d.ok)
    return d


STUDY = register(Study("precise_samples", prepare, figures=[
    FigureSpec("precise_samples", lambda d: fig_precise_samples(d.runs), caption_precise_samples)],
    claims=claims_precise_samples, order=90))

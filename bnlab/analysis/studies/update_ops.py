"""update_ops: TensorFlow's missing update ops (bn.update_stats=false): good training, bad
validation, and precise BN repairing it; the running statistics against the population."""
from __future__ import annotations

from typing import List, Optional

import pandas as pd
from matplotlib.figure import Figure

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import RUNNING_STATS, Claim, FigureSpec, Prepared, Study, register


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
    ok = fr.usable_curves(curves)
    notes = P.footnotes(curves if runs is None else runs, "not averaged")
    if ok.empty or "bn.update_stats" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    values = sorted(ok["bn.update_stats"].dropna().unique(), reverse=True)
    pooled = fr.varying(ok.drop_duplicates("run_id"), exclude=["bn.update_stats"])
    fig, axes = P.new_figure(len(values), sharey=True)
    for ax, v in zip(axes[0], values):
        sub = ok[ok["bn.update_stats"] == v]
        for metric, label, color, ls, marker in UPDATE_OPS_METRICS:
            agg = S.aggregate(sub[sub["metric"] == metric], ["step"], "value")
            if not agg.empty:
                P.band(ax, agg["step"], agg["mean"], P.band_of(agg), label, color, marker, ls)
                P.seed_lines(ax, sub[sub["metric"] == metric], "step", "value", color, by="run_id")
        P.chance_line(ax)
        n = sub["run_id"].nunique()
        ax.set_title(f"bn.update_stats={str(bool(v)).lower()}: "
                     + ("statistics updated" if v else "statistics never updated") + f" (n={n} seeds)", fontsize=9)
        P.epoch_axis(ax)
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel(P.ACC)
    return P.finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


def caption_update_ops(data: Prepared) -> str:
    ok = data.ok
    parts = []
    for v in (False, True):
        s = ok[ok["bn.update_stats"] == v] if "bn.update_stats" in ok else ok.iloc[:0]
        if s.empty:
            continue
        txt = (f"With bn.update_stats={str(v).lower()}, final val/acc in eval mode is {S.stat(fr.final_col(s, 'val/acc'))} "
               f"while train/acc is {S.stat(fr.final_col(s, 'train/acc'))}")
        if fr.FINAL + "val/acc_batch_stats" in s:
            txt += f"; batch statistics give {S.stat(fr.final_col(s, 'val/acc_batch_stats'))}"
        if fr.FINAL + "val/acc_precise_bn" in s:
            txt += f"; precise BN {'restores' if not v else 'gives'} {S.stat(fr.final_col(s, 'val/acc_precise_bn'))}"
        parts.append(txt + ".")
    return " ".join(parts) or "No finished runs."


def claims_update_ops(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty or "bn.update_stats" not in ok:
        return []
    off, on = ok[ok["bn.update_stats"] == False], ok[ok["bn.update_stats"] == True]  # noqa: E712
    out = []
    if not off.empty:
        tr, va = off[fr.FINAL + "train/acc"], off[fr.FINAL + "val/acc"]
        out.append(Claim("Without TensorFlow's update ops the model trains well but fails in eval mode: 'good "
                         "training, bad validation' (seed 000)",
                         f"bn.update_stats=false: train/acc {S.acc_text(tr, fr.FINAL + 'train/acc')}, eval-mode val/acc {S.acc_text(va)}",
                         V.from_bool(bool(tr.mean() >= 0.6 and va.mean() <= 0.3), "train/acc >= 0.6 and val/acc <= 0.3")))
        if fr.FINAL + "val/acc_precise_bn" in off and not on.empty:
            p = off[fr.FINAL + "val/acc_precise_bn"]
            out.append(Claim("Recomputing the population statistics after training repairs it ('BN: the untold "
                             "story', seed 003)",
                             f"bn.update_stats=false with precise BN {S.acc_text(p, fr.FINAL + 'val/acc_precise_bn')} against "
                             f"ordinary BN's eval-mode val/acc {S.acc_text(on[fr.FINAL + 'val/acc'])}",
                             V.from_bool(bool(p.mean() >= on[fr.FINAL + "val/acc"].mean() - 0.02),
                                     "within 0.02 of ordinary BN or above")))
    col = fr.FINAL + "val/acc_batch_stats_bs1"
    if col in ok and ok[col].notna().any():
        out.append(Claim("Testing one example at a time in training mode outputs beta from every BN and destroys test "
                         "accuracy (seed 000)",
                         f"val/acc with batch statistics of one example {S.acc_text(ok[col], col)} (chance {fr.CHANCE:g})",
                         V.from_bool(bool(ok[col].mean() <= 2 * fr.CHANCE), "mean at most twice chance")))
    return out


STUDY = register(Study("update_ops", figures=[
    FigureSpec("update_ops", lambda d: fig_update_ops(d.curves, runs=d.runs), caption_update_ops),
    RUNNING_STATS], claims=claims_update_ops, order=20))

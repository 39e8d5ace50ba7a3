"""placement: BN before or after the activation, or none, with sigmoid and ReLU (Ioffe & Szegedy;
d2l 7.5)."""
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


def fig_placement(runs: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """BN before the activation vs after it vs no BN, one column per activation: val/acc per epoch
    (top; mean and 95% CI over seeds) and final val/acc as bars with the 95% CI and n (bottom)."""
    title = "Where BN sits: before vs after the activation vs no BN, per activation"
    ok, _, _ = fr.split_runs(runs)
    okc = fr.usable_curves(curves)
    notes = P.footnotes(runs, "left out of the means")
    if ok.empty or "model.activation" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    acts = sorted(ok["model.activation"].unique())
    pls = [p for p in ["before_act", "after_act", "none"] if p in set(ok["bn.placement"])]
    fig, axes = P.new_figure(len(acts), 2, height=3.3, sharey="row")
    for j, act in enumerate(acts):
        top, bottom = axes[0, j], axes[1, j]
        for k, pl in enumerate(pls):
            color = P.PLACEMENT_COLOR[pl]
            c = okc[(okc["model.activation"] == act) & (okc["bn.placement"] == pl) & (okc["metric"] == "val/acc")]
            agg = S.aggregate(c, ["step"], "value")
            if not agg.empty:
                P.band(top, agg["step"], agg["mean"], P.band_of(agg), P.PLACEMENT_LABEL[pl], color)
                P.seed_lines(top, c, "step", "value", color, by="run_id")
            vals = ok.loc[(ok["model.activation"] == act) & (ok["bn.placement"] == pl), fr.FINAL + "val/acc"]
            m, lo, hi, n = S.interval(vals, fr.FINAL + "val/acc")
            if n:
                err = P.yerr(m, lo, hi)
                bottom.bar(k, m, color=color, yerr=err, capsize=4, alpha=0.85)
                label = f"{m:.3f}" + (f"\n[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "") + f"\nn={n}"
                if m >= 0.3:  # inside a tall bar, above the error bar's top for a short one
                    bottom.text(k, m / 2, label, ha="center", va="center", fontsize=7, color="white")
                else:
                    top_of = (hi if np.isfinite(hi) else m) + 0.02
                    bottom.text(k, top_of, label, ha="center", va="bottom", fontsize=7, color="black")
        top.set_title(f"model.activation={act}", fontsize=9)
        P.epoch_axis(top)
        P.chance_line(top)
        bottom.set_xticks(range(len(pls)), [P.PLACEMENT_LABEL[p] for p in pls], fontsize=7)
        bottom.set_ylim(0, 1.1)
        P.chance_line(bottom, label=False)
    axes[0, 0].set_ylabel("val/acc, eval mode")
    axes[1, 0].set_ylabel("final val/acc")
    return P.finish(fig, title, notes)


def caption_placement(data: Prepared) -> str:
    ok = data.ok
    if ok.empty:
        return "No finished runs."
    parts = []
    for act, g in ok.groupby("model.activation"):
        vals = ", ".join(f"{P.PLACEMENT_LABEL.get(pl, pl)} {S.stat(fr.final_col(s, 'val/acc'))}"
                         for pl, s in g.groupby("bn.placement"))
        parts.append(f"{act}: {vals}")
    return "Final val/acc, " + "; ".join(parts) + "."


def claims_placement(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty or "bn.placement" not in ok:
        return []
    out = []
    for act in sorted(ok["model.activation"].unique()):
        g = ok[ok["model.activation"] == act]
        before, after, none = (g[g["bn.placement"] == p] for p in ("before_act", "after_act", "none"))
        if not before.empty and not none.empty:
            d = S.paired(before, none, fr.FINAL + "val/acc", fr.FINAL + "val/acc")
            out.append(Claim(f"{act}: BN improves training of LeNet at the same settings (seed 004, d2l 7.5; "
                             "Ioffe & Szegedy)",
                             f"val/acc BN before the activation {S.acc_text(before[fr.FINAL + 'val/acc'])}, no BN "
                             f"{S.acc_text(none[fr.FINAL + 'val/acc'])}; paired {S.diff_text(d)}",
                             V.above(d, 0.0, rule="95% CI of the paired gain above 0")))
        if not before.empty and not after.empty:
            d = S.paired(before, after, fr.FINAL + "val/acc", fr.FINAL + "val/acc")
            m, lo, hi, n = S.diff(d)
            out.append(Claim(f"{act}: BN belongs before the non-linearity (Ioffe & Szegedy 2015; d2l 7.5)",
                             f"val/acc before {S.acc_text(before[fr.FINAL + 'val/acc'])}, after {S.acc_text(after[fr.FINAL + 'val/acc'])}; "
                             f"before − after {S.diff_text(d)}",
                             V.above(d, 0.0, rule="95% CI of before − after above 0")))
    return out


STUDY = register(Study("placement", figures=[FigureSpec("placement", lambda d: fig_placement(d.runs, d.curves),
                                                       caption_placement)], claims=claims_placement, order=60))

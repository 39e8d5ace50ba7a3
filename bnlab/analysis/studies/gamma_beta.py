"""gamma_beta: learned against fixed gamma and beta (bn.affine), sigmoid and ReLU (d2l 7.5 exercise 5;
seed 002)."""
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


def fig_gamma_beta(runs: pd.DataFrame) -> Figure:
    """Learned gamma and beta (bn.affine=true) against fixed gamma=1, beta=0, per activation:
    final val/acc (bars, 95% interval, n) and final train/acc (black marks); seeds as dots."""
    title = "Learned vs fixed gamma and beta, sigmoid and ReLU"
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "left out of the means")
    if ok.empty or "bn.affine" not in ok or "model.activation" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    acts = sorted(ok["model.activation"].unique())
    fig, axes = P.new_figure(len(acts), width=3.6, height=4.0, sharey=True)
    for ax, act in zip(axes[0], acts):
        for k, (aff, color) in enumerate(((True, "tab:blue"), (False, "tab:orange"))):
            s = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == aff)]
            if s.empty:
                continue
            m, lo, hi, n = S.interval(s[fr.FINAL + "val/acc"], fr.FINAL + "val/acc")
            err = P.yerr(m, lo, hi)
            label = "learned gamma, beta (bn.affine=true)" if aff else "fixed gamma=1, beta=0 (bn.affine=false)"
            ax.bar(k, m, color=color, yerr=err, capsize=4, alpha=0.8, label=label)
            ax.plot([k] * n, s[fr.FINAL + "val/acc"], "o", color="k", ms=3, alpha=0.6, label="_seed")
            if fr.FINAL + "train/acc" in s:
                tm = float(s[fr.FINAL + "train/acc"].mean())
                ax.plot([k - 0.35, k + 0.35], [tm, tm], color="k", lw=2, label="mean final train/acc")
            txt = f"{m:.3f}" + (f"\n[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "") + f"\nn={n}"
            ax.text(k, m / 2, txt, ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks([0, 1], ["learned", "fixed"])
        ax.set_title(f"model.activation={act}", fontsize=9)
        ax.set_ylim(0, 1.02)
        P.chance_line(ax)
    axes[0, 0].set_ylabel("final val/acc (bars) and train/acc (black)")
    return P.finish(fig, title, notes)


def caption_gamma_beta(data: Prepared) -> str:
    ok = data.ok
    if ok.empty:
        return "No finished runs."
    parts = [f"{act}, bn.affine={str(bool(aff)).lower()}: val/acc {S.stat(fr.final_col(g, 'val/acc'))}, train/acc "
             f"{S.stat(fr.final_col(g, 'train/acc'))}" for (act, aff), g in ok.groupby(["model.activation", "bn.affine"])]
    return "Final accuracies: " + "; ".join(parts) + "."


def claims_gamma_beta(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty or "bn.affine" not in ok:
        return []
    out = []
    for act in sorted(ok["model.activation"].unique()):
        a = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == True)]  # noqa: E712 (nullable bool)
        b = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == False)]  # noqa: E712
        g = S.paired(a, b, fr.FINAL + "val/acc", fr.FINAL + "val/acc")
        m, lo, hi, n = S.diff(g)
        src = ("without gamma and beta a sigmoid after BN works in its near-linear range, so the network loses "
               "non-linearity (seed 002, citing Ioffe & Szegedy)" if act == "sigmoid" else
               "gamma and beta let each layer choose the scale and shift its non-linearity sees (seed 002)")
        out.append(Claim(f"{act}: learned gamma and beta beat fixed ones: {src}",
                         f"val/acc learned {S.acc_text(a[fr.FINAL + 'val/acc'])}, fixed {S.acc_text(b[fr.FINAL + 'val/acc'])}; "
                         f"learned − fixed per seed {S.diff_text(g)}",
                         V.above(g, 0.0, rule="95% CI of the paired difference above 0")))
    return out


STUDY = register(Study("gamma_beta", figures=[FigureSpec("gamma_beta", lambda d: fig_gamma_beta(d.runs), caption_gamma_beta)],
                       claims=claims_gamma_beta, order=110))

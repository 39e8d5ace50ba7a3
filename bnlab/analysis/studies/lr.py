"""lr: the learning rate with and without BN: where every seed learns (the convergence region),
divergence and stalls; the finished runs and their regions computed once."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import Claim, FigureSpec, Prepared, Study, register


def _variant(placement: str) -> str:
    return "without BN" if placement == "none" else f"with BN ({placement})"


# A run "learns" when its loss stayed finite and its final training accuracy is at least twice
# chance: a finite loss alone also counts runs that sit at chance for good (dead ReLUs, saturated
# sigmoids), which are no more converged than a NaN.
LEARNED = 2 * fr.CHANCE


def learned(runs: pd.DataFrame) -> pd.Series:
    """Per run: not diverged and final train/acc >= LEARNED (False where train/acc is missing)."""
    acc = runs[fr.FINAL + "train/acc"] if fr.FINAL + "train/acc" in runs else pd.Series(np.nan, index=runs.index)
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
    notes = P.footnotes(runs, "marked x at chance (count below)")
    if fin.empty or "optim.lr" not in fin:
        return P.empty_figure(title, "no finished runs", notes)
    ok = fin[~fin["diverged"].astype(bool)]
    pooled = fr.varying(fin, exclude=["optim.lr", "bn.placement"])
    fig, axes = P.new_figure(1, width=6.5, height=4.4)
    ax = axes[0, 0]
    placements = [p for p in ["before_act", "after_act", "none"] if p in set(fin["bn.placement"])]
    placements += sorted(set(fin["bn.placement"]) - set(placements))
    regions = convergence_regions(fin)
    for k, pl in enumerate(placements):
        color = P.PLACEMENT_COLOR.get(pl, P.COLORS[k % len(P.COLORS)])
        agg = S.aggregate(ok[ok["bn.placement"] == pl], ["optim.lr"], fr.FINAL + "val/acc")
        if not agg.empty:
            P.band(ax, agg["optim.lr"], agg["mean"], P.band_of(agg), _variant(pl), color)
            P.seed_lines(ax, ok[ok["bn.placement"] == pl], "optim.lr", fr.FINAL + "val/acc", color)
        P.mark_diverged(ax, fin[fin["bn.placement"] == pl], "optim.lr", color, _variant(pl), jitter=1.12 ** k, row=k)
        y = 1.04 + 0.035 * k
        for lo, hi in regions.get(pl, []):
            ax.plot([lo, hi], [y, y], lw=5, color=color, alpha=0.5, solid_capstyle="butt",
                    label=f"all seeds learn: {_variant(pl)}")
    P.chance_line(ax)
    P.log_ticks(ax, sorted(fin["optim.lr"].unique()))
    ax.set_ylim(0, 1.04 + 0.035 * len(placements) + 0.02)
    ax.set_xlabel("optim.lr (SGD learning rate, log)")
    ax.set_ylabel("final val/acc, eval mode")
    notes.append(f"bars: every seed learns (finite loss, final train/acc >= {LEARNED:g})")
    return P.finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


def _fmt_lr(v: float) -> str:
    return f"{v:g}"


def caption_lr(data: Prepared) -> str:
    fin = data.fin
    if fin.empty:
        return "No finished runs."
    regions = data.regions
    fin = fin.assign(_learned=learned(fin))
    parts = []
    for pl, g in fin.groupby("bn.placement"):
        ok = g[~g["diverged"].astype(bool)]
        agg = S.aggregate(ok, ["optim.lr"], fr.FINAL + "val/acc")
        spans = regions.get(str(pl), [])
        reg = " and ".join(f"[{_fmt_lr(lo)}, {_fmt_lr(hi)}]" for lo, hi in spans) or "no learning rate"
        txt = f"{_variant(pl)}: every seed learns for lr in {reg}"
        # The best rate among those where every seed learned: a mean over the survivors would flatter.
        safe = agg[agg["optim.lr"].map(lambda x: any(lo <= x <= hi for lo, hi in spans))]
        if not safe.empty:
            best = safe.loc[safe["mean"].idxmax()]
            txt += f", where the best val/acc is {S.agg_text(best)} at lr {_fmt_lr(best['optim.lr'])}"
        for what, sel in (("diverged", g["diverged"].astype(bool)),
                          ("stalled (finite loss, no learning)", ~g["diverged"].astype(bool) & ~g["_learned"])):
            per = g[sel].groupby("optim.lr").size()
            if not per.empty:
                txt += f"; {what}: " + ", ".join(f"{k} of {int((g['optim.lr'] == lr).sum())} at lr {_fmt_lr(lr)}"
                                                 for lr, k in per.items())
        parts.append(txt)
    return ("A run learns when its loss stays finite and its final train/acc is at least "
            f"{LEARNED:g} (twice chance). " + ". ".join(p[0].upper() + p[1:] for p in parts) + ".")


def claims_lr(data: Prepared) -> List[Claim]:
    fin = data.fin
    if fin.empty or "optim.lr" not in fin:
        return []
    regions = data.regions

    def top(pl):
        spans = regions.get(pl, [])
        return max((hi for _, hi in spans), default=float("nan"))

    def text(pl):
        spans = regions.get(pl, [])
        return " and ".join(f"[{lo:g}, {hi:g}]" for lo, hi in spans) or "none"

    bn, none = top("before_act"), top("none")
    return [Claim("BN allows much larger learning rates: a wider region of convergence (Ioffe & Szegedy; d2l 7.5 "
                  "exercise 2, seed 004)",
                  f"learning rates where every seed learns (finite loss, train/acc >= {LEARNED:g}): with BN "
                  f"{text('before_act')}, without {text('none')}",
                  V.from_bool(bool(np.isfinite(bn) and (not np.isfinite(none) or bn > none)),
                          "the largest such rate is larger with BN"))]


def prepare(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    d = Prepared(runs, curves)
    d.fin = runs[runs["status"].eq("FINISHED")] if not runs.empty else runs
    d.regions = convergence_regions(d.fin) if not d.fin.empty and "optim.lr" in d.fin else {}
    return d


STUDY = register(Study("lr", prepare, figures=[FigureSpec("lr", lambda d: fig_lr(d.runs), caption_lr)],
                       claims=claims_lr, order=50))

"""norm_batch: the normalisation (ghost) batch size at a fixed SGD batch, and FrozenBN (Wu & Johnson
2021, Fig. 2 and sec. 4); each run's normalisation batch and frozen flag computed once."""
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
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "marked x at chance")
    if ok.empty or "data.batch_size" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    ok = ok.assign(_norm=norm_batch_size(ok), _frozen=_frozen(ok))
    plain, frozen = ok[~ok["_frozen"]], ok[ok["_frozen"]]
    fig, axes = P.new_figure(2 if not frozen.empty else 1, sharey=True)
    ax = axes[0, 0]
    series = [(plain, fr.FINAL + "train/acc", "train/acc, mini-batch statistics", "black", "s", "--"),
              (plain, fr.FINAL + "val/acc_batch_stats", "val/acc, mini-batch statistics", "tab:blue", "^", ":"),
              (plain, fr.FINAL + "val/acc_precise_bn", "val/acc, population statistics (precise BN)", "tab:green", "D", "-"),
              (plain, fr.FINAL + "val/acc", "val/acc, EMA running statistics", "tab:red", "o", "-")]
    for frame, col, label, color, marker, ls in series:
        if frame.empty or col not in frame or frame[col].notna().sum() == 0:
            continue
        agg = S.aggregate(frame, ["_norm"], col)
        P.band(ax, agg["_norm"], agg["mean"], P.band_of(agg), label, color, marker, ls)
        P.seed_lines(ax, frame, "_norm", col, color)
    ax.set_title("ordinary BN (mini-batch statistics in training)", fontsize=9)
    if not frozen.empty:
        ax1 = axes[0, 1]
        for frame, col, label, color, marker, ls in (
                (frozen, fr.FINAL + "val/acc", "FrozenBN: val/acc, population statistics", "tab:purple", "v", "-"),
                (frozen, fr.FINAL + "train/acc", "FrozenBN: train/acc (last epoch frozen)", "tab:gray", "s", "--"),
                (plain, fr.FINAL + "val/acc_precise_bn", "ordinary BN: val/acc, population statistics (precise BN)",
                 "tab:green", "D", "-")):
            if col in frame and frame[col].notna().any():
                agg = S.aggregate(frame, ["_norm"], col)
                P.band(ax1, agg["_norm"], agg["mean"], P.band_of(agg), label, color, marker, ls)
                P.seed_lines(ax1, frame, "_norm", col, color)
        ep = int(pd.to_numeric(frozen["bn.freeze_at"]).iloc[0])
        ax1.set_title(f"FrozenBN from epoch {ep} (bn.freeze_at={ep})", fontsize=9)
    sizes = sorted(ok["_norm"].unique())
    for a in axes[0]:
        P.chance_line(a)
        P.log_ticks(a, sizes, base=2)
        a.set_xlabel(f"normalisation batch (ghost batch; SGD batch {int(ok['data.batch_size'].iloc[0])}, log2)")
        a.set_ylim(0, 1.02)
    ax.set_ylabel("final accuracy")
    return P.finish(fig, title, notes)


def caption_norm_batch(data: Prepared) -> str:
    ok = data.ok
    if ok.empty:
        return "No finished runs."
    parts = []
    for (nb, frozen), g in data.nb.groupby(["_norm", "_frozen"]):
        if frozen:  # a frozen model's val/acc uses the frozen population statistics it trained with
            parts.append(f"FrozenBN at normalisation batch {nb:g}: train/acc (last epoch frozen) "
                         f"{S.stat(fr.final_col(g, 'train/acc'))}, val/acc with the frozen statistics {S.stat(fr.final_col(g, 'val/acc'))}, "
                         f"with mini-batch statistics {S.stat(fr.final_col(g, 'val/acc_batch_stats'))}")
            continue
        parts.append(f"BN at normalisation batch {nb:g}: train/acc {S.stat(fr.final_col(g, 'train/acc'))}, val/acc with "
                     f"mini-batch statistics {S.stat(fr.final_col(g, 'val/acc_batch_stats'))}, with population statistics "
                     f"{S.stat(fr.final_col(g, 'val/acc_precise_bn'))}, EMA {S.stat(fr.final_col(g, 'val/acc'))}")
    return "Final accuracies: " + "; ".join(parts) + "."


def claims_norm_batch(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty:
        return []
    ok = data.nb
    plain, frozen = ok[~ok["_frozen"]], ok[ok["_frozen"]]
    sizes = sorted(plain["_norm"].unique())
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    ps, pb = plain[plain["_norm"] == small], plain[plain["_norm"] == big]
    pop = fr.FINAL + "val/acc_precise_bn"
    out = []
    d = S.paired(pb, ps, pop, pop)
    out.append(Claim("Small normalisation batches lower the accuracy with population statistics (Wu & Johnson 2021, "
                     "Fig. 2)",
                     f"val/acc with population statistics: normalisation batch {small:g}: {S.acc_text(ps[pop], pop)}, "
                     f"{big:g}: {S.acc_text(pb[pop], pop)}",
                     V.above(d, 0.0, rule=f"paired gain {big:g} vs {small:g} "
                             f"{S.diff_text(d)}, 95% CI above 0")))
    inc = S.paired(ps, ps, fr.FINAL + "val/acc_batch_stats", pop)
    out.append(Claim("At small normalisation batches validation with mini-batch statistics beats validation with "
                     "population statistics: a train-test inconsistency (Wu & Johnson 2021, sec. 4)",
                     f"batch {small:g}: mini-batch − population statistics per seed {S.diff_text(inc)}; at {big:g}: "
                     f"{S.diff_text(S.paired(pb, pb, fr.FINAL + 'val/acc_batch_stats', pop))}",
                     V.above(inc, 0.0, rule="95% CI above 0 at the smallest batch")))
    if not frozen.empty:
        fs = frozen[frozen["_norm"] == small]
        g = S.paired(fs, ps, fr.FINAL + "val/acc", pop)
        out.append(Claim("FrozenBN (training the last epochs with fixed population statistics) repairs the "
                         "inconsistency of small normalisation batches (Wu & Johnson 2021, sec. 4)",
                         f"batch {small:g}: FrozenBN val/acc {S.acc_text(fs[fr.FINAL + 'val/acc'])} against ordinary BN with "
                         f"population statistics {S.acc_text(ps[pop], pop)}; paired {S.diff_text(g)}",
                         V.above(g, 0.0, rule="95% CI of the paired gain above 0")))
    return out


def prepare(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    d = Prepared(runs, curves)
    d.nb = d.ok.assign(_norm=norm_batch_size(d.ok), _frozen=_frozen(d.ok)) if not d.ok.empty else d.ok
    return d


STUDY = register(Study("norm_batch", prepare, figures=[
    FigureSpec("norm_batch", lambda d: fig_norm_batch(d.runs), caption_norm_batch)],
    claims=claims_norm_batch, order=100))

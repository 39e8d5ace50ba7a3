"""batch_size: the training batch size with and without BN: running, batch and precise statistics,
and batch statistics of one example at test time (seed 000)."""
from __future__ import annotations

from typing import List

import pandas as pd
from matplotlib.figure import Figure

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import Claim, FigureSpec, Prepared, Study, register


def fig_batch_size(runs: pd.DataFrame) -> Figure:
    """Final val/acc vs training batch size (log2 axis): with BN, evaluated with the running
    statistics (eval mode), with batch statistics and with precise BN; without BN (eval mode).
    Right panel: batch statistics from ONE example per batch (val/acc_batch_stats_bs1) collapse to
    chance whatever the training batch size. Mean and 95% CI over seeds."""
    title = "Batch size: running, batch and precise-BN statistics; batch statistics of one example collapse"
    ok, _, _ = fr.split_runs(runs)
    notes = P.footnotes(runs, "marked x at chance")
    if ok.empty or "data.batch_size" not in ok:
        return P.empty_figure(title, "no finished runs", notes)
    pooled = fr.varying(ok, exclude=["data.batch_size", "bn.placement"])
    with_bn, no_bn = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    fig, axes = P.new_figure(2, sharey=True)
    ax, ax1 = axes[0]
    series = [(with_bn, "val/acc", "BN, running statistics (eval mode)", "tab:red", "o", "-"),
              (with_bn, "val/acc_batch_stats", "BN, batch statistics (training mode)", "tab:blue", "^", ":"),
              (with_bn, "val/acc_precise_bn", "BN, precise BN", "tab:green", "D", "-"),
              (no_bn, "val/acc", "no BN (eval mode)", "tab:gray", "s", "--")]
    for frame, metric, label, color, marker, ls in series:
        col = fr.FINAL + metric
        if frame.empty or col not in frame or frame[col].notna().sum() == 0:
            continue
        agg = S.aggregate(frame, ["data.batch_size"], col)
        P.band(ax, agg["data.batch_size"], agg["mean"], P.band_of(agg), label, color, marker, ls)
        P.seed_lines(ax, frame, "data.batch_size", col, color)
    for k, (pl, frame) in enumerate(runs.groupby("bn.placement")):
        P.mark_diverged(ax, frame, "data.batch_size", P.PLACEMENT_COLOR.get(pl, "k"), P.PLACEMENT_LABEL.get(pl, pl),
                    jitter=1.12 ** k, row=k)
    col = fr.FINAL + "val/acc_batch_stats_bs1"
    if col in with_bn and with_bn[col].notna().any():
        agg = S.aggregate(with_bn, ["data.batch_size"], col)
        P.band(ax1, agg["data.batch_size"], agg["mean"], P.band_of(agg),
              "BN, batch statistics of ONE example (train mode, batch size 1 at test)", "tab:purple", "v", "-")
    else:
        ax1.text(0.5, 0.5, "val/acc_batch_stats_bs1 not logged", ha="center", transform=ax1.transAxes)
    bss = sorted(ok["data.batch_size"].unique())
    for a in (ax, ax1):
        P.chance_line(a)
        P.log_ticks(a, bss, base=2)
        a.set_xlabel("training batch size (examples, log2)")
        a.set_ylim(0, 1.02)
    ax.set_ylabel("final val/acc")
    ax.set_title("test with running / batch / precise statistics", fontsize=9)
    ax1.set_title("test in training mode, one example per batch", fontsize=9)
    return P.finish(fig, title, notes + (["pooled over " + ", ".join(pooled)] if pooled else []))


def caption_batch_size(data: Prepared) -> str:
    ok = data.ok
    if ok.empty:
        return "No finished runs."
    bn, nobn = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    parts = []
    for b in sorted({ok["data.batch_size"].min(), ok["data.batch_size"].max()}):
        s, n = bn[bn["data.batch_size"] == b], nobn[nobn["data.batch_size"] == b]
        txt = f"at batch size {b:g}, with BN: running statistics {S.stat(fr.final_col(s, 'val/acc'))}"
        if fr.FINAL + "val/acc_batch_stats" in s:
            txt += f", batch statistics {S.stat(fr.final_col(s, 'val/acc_batch_stats'))}"
        if fr.FINAL + "val/acc_precise_bn" in s:
            txt += f", precise BN {S.stat(fr.final_col(s, 'val/acc_precise_bn'))}"
        if not n.empty:
            txt += f"; without BN {S.stat(fr.final_col(n, 'val/acc'))}"
        parts.append(txt)
    out = "Final val/acc " + "; ".join(parts) + "."
    if fr.FINAL + "val/acc_batch_stats_bs1" in bn and bn[fr.FINAL + "val/acc_batch_stats_bs1"].notna().any():
        out += (" Batch statistics from one example per batch give "
                f"{S.stat(fr.final_col(bn, 'val/acc_batch_stats_bs1'))} over all BN runs (chance: {fr.CHANCE:g}).")
    return out


def claims_batch_size(data: Prepared) -> List[Claim]:
    ok = data.ok
    if ok.empty or "bn.placement" not in ok:
        return []
    bn, plain = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    out = []
    col = fr.FINAL + "val/acc_batch_stats_bs1"
    if col in bn and bn[col].notna().any():
        out.append(Claim("Testing one example at a time in training mode outputs beta from every BN: chance accuracy "
                         "whatever the training batch size (seed 000)",
                         f"val/acc with batch statistics of one example {S.acc_text(bn[col], col)} over every BN run "
                         f"(chance {fr.CHANCE:g})",
                         V.from_bool(bool(bn[col].mean() <= 2 * fr.CHANCE), "mean at most twice chance")))
    if fr.FINAL + "val/acc_precise_bn" in bn:
        per = {b: S.paired(g, g, fr.FINAL + "val/acc_precise_bn", fr.FINAL + "val/acc")
               for b, g in bn.groupby("data.batch_size")}
        worst = min(per, key=lambda b: S.diff(per[b])[0])
        out.append(Claim("Precise BN is at least as good as the EMA running statistics (Wu & Johnson 2021, sec. 3)",
                         "precise − running per seed, by batch size: "
                         + ", ".join(f"{b:g}: {S.diff(d)[0]:+.3f}" for b, d in per.items())
                         + f"; lowest at batch {worst:g}: {S.diff_text(per[worst])}",
                         V.from_bool(bool(all(S.diff(d)[0] >= -0.005 for d in per.values())),
                                 "mean difference >= -0.005 at every batch size")))
    if not plain.empty:
        big = ok["data.batch_size"].max()
        a, b = bn[bn["data.batch_size"] == big], plain[plain["data.batch_size"] == big]
        d = S.paired(a, b, fr.FINAL + "val/acc", fr.FINAL + "val/acc")
        out.append(Claim("BN lets a network train at settings where the plain one does not (seed 004, d2l 7.5; "
                         "Ioffe & Szegedy)",
                         f"batch {big:g} at the same lr and epochs: with BN {S.acc_text(a[fr.FINAL + 'val/acc'])}, without "
                         f"{S.acc_text(b[fr.FINAL + 'val/acc'])}; paired {S.diff_text(d)}",
                         V.above(d, 0.0, rule="95% CI of the paired gain above 0")))
    return out


STUDY = register(Study("batch_size", figures=[FigureSpec("batch_size", lambda d: fig_batch_size(d.runs), caption_batch_size)],
                       claims=claims_batch_size, order=40))

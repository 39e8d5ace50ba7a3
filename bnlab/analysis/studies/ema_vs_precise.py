"""ema_vs_precise: step-level evaluation through a step-decayed learning rate: the EMA running
statistics at several momenta against precise BN (Wu & Johnson 2021, sec. 3); the step-level frame,
the gaps and the learning-rate changes computed once."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import Claim, FigureSpec, Prepared, Study, register


def step_wide(curves: pd.DataFrame) -> pd.DataFrame:
    """Step-level metrics (step/<metric>, MLflow step = global SGD step) of the usable runs as one
    row per (run, step) with a column per metric (prefix kept), plus seed and bn.momentum."""
    ok = fr.usable_curves(curves)
    sub = ok[ok["metric"].str.startswith(fr.STEP)] if not ok.empty else ok
    if sub.empty:
        return pd.DataFrame()
    wide = sub.pivot_table(index=["run_id", "step"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    meta = [c for c in ("seed", "bn.momentum") if c in sub]
    return wide.merge(sub.drop_duplicates("run_id")[["run_id", *meta]], on="run_id", how="left")


def _shadow_cols(wide: pd.DataFrame, prefix: str = fr.STEP + "val/acc_shadow/") -> Dict[float, str]:
    return {float(c[len(prefix):]): c for c in wide.columns if c.startswith(prefix)}


def _lr_changes(wide: pd.DataFrame) -> List[float]:
    """Global steps at which the scheduled learning rate changed (from step/lr)."""
    if fr.STEP + "lr" not in wide:
        return []
    lr = wide.groupby("step")[fr.STEP + "lr"].mean().sort_index()
    return [float(s) for s, a, b in zip(lr.index[1:], lr.to_numpy()[:-1], lr.to_numpy()[1:]) if not np.isclose(a, b)]


def ema_gaps(wide: pd.DataFrame) -> pd.DataFrame:
    """Per run and step: precise-BN accuracy minus EMA accuracy for each momentum (the run's own
    bn.momentum: step/val/acc; shadows: step/val/acc_shadow/<m>). Columns run_id, seed, step,
    momentum, gap, lr."""
    if wide.empty or fr.STEP + "val/acc_precise_bn" not in wide:
        return pd.DataFrame(columns=["run_id", "seed", "step", "momentum", "gap", "lr"])
    parts = []
    own = wide["bn.momentum"] if "bn.momentum" in wide else pd.Series(np.nan, index=wide.index)
    cols = {**{m: c for m, c in _shadow_cols(wide).items()}}
    for m, c in [(None, fr.STEP + "val/acc"), *sorted(cols.items())]:
        if c not in wide:
            continue
        mom = own if m is None else pd.Series(m, index=wide.index)
        parts.append(pd.DataFrame({"run_id": wide["run_id"], "seed": wide.get("seed"), "step": wide["step"],
                                   "momentum": mom.astype(float),
                                   "gap": wide[fr.STEP + "val/acc_precise_bn"] - wide[c],
                                   "lr": wide.get(fr.STEP + "lr", pd.Series(np.nan, index=wide.index))}))
    out = pd.concat(parts, ignore_index=True)
    return out.drop_duplicates(["run_id", "step", "momentum"])


def fig_ema_vs_precise(curves: pd.DataFrame, runs: Optional[pd.DataFrame] = None,
                       wide: Optional[pd.DataFrame] = None) -> Figure:
    """Step-level validation accuracy through a run with a step decay of the learning rate: EMA
    running statistics at several momenta (the run's own and its shadows) against precise BN and
    batch statistics (top); the gap precise − EMA per momentum, with the learning rate (bottom).
    Mean and 95% band over seeds; each seed thin where n <= 5."""
    title = "EMA vs precise BN during training: stale EMA statistics while the learning rate is high"
    notes = P.footnotes(curves if runs is None else runs, "not averaged")
    wide = step_wide(curves) if wide is None else wide
    if wide.empty or fr.STEP + "val/acc" not in wide:
        return P.empty_figure(title, "no step-level metrics (train.eval_every) logged", notes)
    fig, axes = P.new_figure(1, 2, width=8.0, height=3.4, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    own = wide["bn.momentum"].dropna().unique() if "bn.momentum" in wide else []
    series = [(fr.STEP + "val/acc_precise_bn", "precise BN (population statistics)", "tab:green", "-")]
    series += [(fr.STEP + "val/acc_batch_stats", "batch statistics", "tab:blue", ":")]
    moms = {float(own[0]) if len(own) == 1 else float("nan"): fr.STEP + "val/acc", **_shadow_cols(wide)}
    ordered = sorted(moms.items(), key=lambda kv: -kv[0] if np.isfinite(kv[0]) else 0)
    cmap = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    colors = {m: cmap[i % len(cmap)] for i, (m, _) in enumerate(ordered)}
    series += [(c, f"EMA, momentum {m:g}", colors[m], "-") for m, c in ordered]
    main = {fr.STEP + "val/acc_precise_bn", fr.STEP + "val/acc"}
    for col, label, color, ls in series:
        if col not in wide:
            continue
        long = wide[["run_id", "seed", "step", col]].dropna().assign(metric=col.replace(fr.STEP, ""))
        agg = S.aggregate(long, ["step"], col)
        # Bands and seed lines only for precise BN and the run's own EMA: eight bands hide each other.
        band = P.band_of(agg) if col in main else np.full(len(agg), np.nan)
        P.band(top, agg["step"], agg["mean"], band, label, color, marker="", ls=ls)
        if col in main:
            P.seed_lines(top, long, "step", col, color, by="run_id")
    top.set_ylabel("val/acc on the step-level subset")
    top.set_ylim(max(0.0, float(np.nanmin(wide[fr.STEP + "val/acc"])) - 0.05), 1.0)
    gaps = ema_gaps(wide)
    for m, _ in ordered:
        g = gaps[np.isclose(gaps["momentum"], m)] if np.isfinite(m) else gaps[gaps["momentum"].isna()]
        if g.empty:
            continue
        agg = S.aggregate(g, ["step"], "gap")
        P.band(bottom, agg["step"], agg["mean"], P.band_of(agg), f"_gap {m:g}", colors[m], marker="", ls="-")
    bottom.axhline(0, color="0.5", lw=0.8)
    if not gaps.empty:
        means = gaps.groupby(["momentum", "step"])["gap"].mean()
        bottom.set_ylim(min(-0.05, float(means.min()) - 0.05), float(means.max()) + 0.1)
    bottom.set_ylabel("precise BN − EMA\n(val/acc, mean and 95% CI)")
    bottom.set_xlabel("global SGD step")
    for ax in (top, bottom):
        for s in _lr_changes(wide):
            ax.axvline(s, color="0.3", ls="--", lw=0.8, label="learning-rate decay")
    if fr.STEP + "lr" in wide:
        lr = wide.groupby("step")[fr.STEP + "lr"].mean().sort_index()
        twin = bottom.twinx()
        twin.plot(lr.index, lr.to_numpy(), color="0.4", lw=1.2, drawstyle="steps-post", label="learning rate (right axis)")
        twin.set_yscale("log")
        twin.set_ylabel("learning rate (log)")
    n = wide["run_id"].nunique()
    notes.append(f"{n} run(s); every {int(np.diff(sorted(wide['step'].unique()))[0]) if wide['step'].nunique() > 1 else 0} steps")
    return P.finish(fig, title, notes, legend_axes=fig.axes)


def caption_ema_vs_precise(data: Prepared) -> str:
    wide = data.wide
    if wide.empty:
        return "No step-level metrics."
    gaps = data.gaps
    changes = data.changes
    cut = changes[0] if changes else wide["step"].max() + 1
    parts = []
    for m, g in gaps.groupby("momentum"):
        early = g[g["step"] < cut].groupby("run_id")["gap"].mean()
        late = g[g["step"] > (changes[-1] if changes else cut)].groupby("run_id")["gap"].mean()
        parts.append(f"momentum {m:g}: {S.stat(early)} before the first decay, {S.stat(late)} after the last")
    return ("Precise-BN minus EMA val/acc on the step-level subset, averaged per run over the evaluations of each "
            "phase (mean ± 95% CI over runs): " + "; ".join(parts) + ".")


def claims_ema_vs_precise(data: Prepared) -> List[Claim]:
    wide = data.wide
    if wide.empty:
        return []
    gaps = data.gaps
    own = gaps[gaps["momentum"].round(9).isin(wide["bn.momentum"].round(9).unique())] if "bn.momentum" in wide else gaps
    changes = data.changes
    if not changes or own.empty:
        return []
    first, last = changes[0], changes[-1]
    hi_lr = own[own["step"] < first].groupby("run_id")["gap"].mean()
    lo_lr = own[own["step"] > last].groupby("run_id")["gap"].mean()
    m_hi, lo_hi, _, _ = S.diff(hi_lr)
    m_lo, _, hi_lo, _ = S.diff(lo_lr)
    mom = float(wide["bn.momentum"].iloc[0]) if "bn.momentum" in wide else float("nan")
    out = [Claim("While the learning rate is high, the EMA statistics lag the weights: precise BN beats them "
                 "(Wu & Johnson 2021, sec. 3)",
                 f"precise − EMA(momentum {mom:g}) val/acc, averaged over the evaluations before the first decay "
                 f"(step {first:g}): {S.diff_text(hi_lr)} per run",
                 V.above(hi_lr, 0.0, rule="95% CI above 0")),
           Claim("... and the gap closes after the learning rate decays (Wu & Johnson 2021)",
                 f"after the last decay (step {last:g}): {S.diff_text(lo_lr)}",
                 V.from_bool(bool(np.isfinite(hi_lo) and abs(m_lo) < 0.25 * max(m_hi, 1e-9) and hi_lo < max(m_hi, 0)),
                         "late mean below a quarter of the early mean, late CI below the early mean"))]
    # Smaller momenta: larger early gaps (stale statistics), from the shadows.
    early = gaps[gaps["step"] < first].groupby("momentum")["gap"].mean().sort_index()
    if len(early) >= 3:
        mono = bool((np.diff(early.to_numpy()) <= 0.005).all())
        out.append(Claim("A smaller EMA momentum is staler while the weights move fast (seed 000: the decay matters "
                         "for validation)",
                         "mean early gap by momentum: " + ", ".join(f"{m:g}: {g:+.3f}" for m, g in early.items()),
                         V.from_bool(mono, "the early gap does not grow with the momentum (tolerance 0.005)")))
    return out


def prepare(runs: pd.DataFrame, curves: pd.DataFrame) -> Prepared:
    d = Prepared(runs, curves)
    d.wide = step_wide(curves)
    d.gaps = ema_gaps(d.wide)
    d.changes = _lr_changes(d.wide)
    return d


STUDY = register(Study("ema_vs_precise", prepare, figures=[
    FigureSpec("ema_vs_precise", lambda d: fig_ema_vs_precise(d.curves, runs=d.runs, wide=d.wide),
               caption_ema_vs_precise)], claims=claims_ema_vs_precise, order=80))

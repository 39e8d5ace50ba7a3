"""The drawing kit of the report: bands and seed lines, figure frames with titles, legends and
footnotes, chance lines, log ticks, curves per config group; and the figures several studies share
(curves per epoch, running statistics against the population). Pure: frames in, a matplotlib
Figure out (no pyplot state, no files)."""
from __future__ import annotations

import textwrap
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from bnlab.analysis import frames as fr
from bnlab.analysis import stats as S

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan"]

PLACEMENT_LABEL = {"before_act": "BN before activation", "after_act": "BN after activation", "none": "no BN"}

PLACEMENT_COLOR = {"before_act": "tab:blue", "after_act": "tab:orange", "none": "tab:gray"}

ACC = "accuracy (fraction correct)"

SEED_LINES_MAX_N = 5  # where a group has at most this many seeds, each seed is drawn as a thin line


def yerr(m: float, lo: float, hi: float):
    """Error-bar lengths for matplotlib from an interval; None where there is none. The logit
    interval is that of the mean logit, so a skewed sample's arithmetic mean can sit just outside
    it: the bar then starts at the point (length 0 on that side)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [[max(0.0, m - lo)], [max(0.0, hi - m)]]


def band_of(agg: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
    """(low, high) band arrays of an S.aggregate() frame."""
    return agg["lo"].to_numpy(float), agg["hi"].to_numpy(float)


def footnotes(frame: pd.DataFrame, diverged_how: str, pooled: Sequence[str] = ()) -> List[str]:
    _, left, n_div = fr.split_runs(fr.run_level(frame))
    notes = []
    if left:
        notes.append(f"left out: {fr.left_out_text(left)} run(s)")
    if n_div:
        notes.append(f"{n_div} diverged run(s) {diverged_how}")
    if pooled:
        notes.append("pooled over " + ", ".join(pooled))
    return notes


def band(ax, x, mean, ci, label: str, color, marker: str = "o", ls: str = "-", zorder: int = 2):
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


def seed_lines(ax, frame: pd.DataFrame, x: str, y: str, color, by: str = "seed") -> None:
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


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8, **kw):
    fig = Figure(figsize=(width * ncols + 2.2, height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def finish(fig: Figure, title: str, notes: Sequence[str] = (), legend_axes=None) -> Figure:
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


def empty_figure(title: str, why: str, notes: Sequence[str] = ()) -> Figure:
    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return finish(fig, title, notes)


def chance_line(ax, label: bool = True):
    ax.axhline(fr.CHANCE, color="0.5", ls=":", lw=1, label="chance (10 classes)" if label else "_chance")


def epoch_axis(ax):
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def log_ticks(ax, values: Sequence[float], base: int = 10):
    ax.set_xscale("log", base=base)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def curve_groups(ax, curves: pd.DataFrame, metric: str, groups: Sequence[str], colors=None, ls="-",
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
    agg = S.aggregate(sub, [*groups, "step"], "value")
    keys = agg[list(groups)].drop_duplicates() if groups else pd.DataFrame(index=[0])
    for i, (_, key) in enumerate(keys.iterrows()):
        g, runs_g = agg, sub
        for c in groups:
            g = g[fr.same(g[c], key[c])]
            runs_g = runs_g[fr.same(fr.hashable(runs_g[c]), key[c])]
        color = (colors or {}).get(i, COLORS[i % len(COLORS)])
        if log:
            x, m, ci = (g[c].to_numpy(float) for c in ("step", "mean", "ci"))
            ax.plot(x, 10 ** m, marker="o", ls=ls, color=color, label=fr.group_label(key, groups), ms=4)
            ci = np.where(np.isfinite(ci), ci, 0.0)
            ax.fill_between(x, 10 ** (m - ci), 10 ** (m + ci), color=color, alpha=0.2, lw=0)
            seed_lines(ax, runs_g.assign(value=10 ** runs_g["value"]), "step", "value", color, by="run_id")
        else:
            band(ax, g["step"], g["mean"], band_of(g), fr.group_label(key, groups), color, ls=ls)
            seed_lines(ax, runs_g, "step", "value", color, by="run_id")


def mark_diverged(ax, runs: pd.DataFrame, xcol: str, color, label: str, jitter: float = 1.0, row: int = 0):
    """An 'x' at the chance line for every x where runs diverged, with the count below it (one
    row of counts per variant, so that variants at the same x stay readable)."""
    d = runs[runs["status"].eq("FINISHED") & runs["diverged"].astype(bool)]
    if d.empty:
        return
    counts = d.groupby(xcol).size()
    xs = np.asarray(counts.index, float) * jitter
    ax.plot(xs, [fr.CHANCE] * len(xs), "x", color=color, ms=9, mew=2, ls="none", label=f"diverged: {label}")
    for x, c in zip(xs, counts.to_numpy()):
        ax.annotate(str(c), (x, fr.CHANCE), textcoords="offset points", xytext=(0, -12 - 9 * row), ha="center",
                    fontsize=7, color=color)

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
    ok = fr.usable_curves(curves)
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
    notes = footnotes(curves if runs is None else runs, "not averaged") + shadow_notes
    ok = ok[ok["metric"].isin(["bnstats/mean_err", "bnstats/var_err"])] if not ok.empty else ok
    if ok.empty:
        return empty_figure(title, "no bnstats/* metrics logged", notes)
    groups = ["bn.momentum"] if from_shadows else fr.varying(ok.drop_duplicates("run_id"))
    fig, axes = new_figure(2, sharey=False)
    for ax, metric, label in [(axes[0, 0], "bnstats/mean_err", "running mean"),
                              (axes[0, 1], "bnstats/var_err", "running variance")]:
        sub = ok[ok["metric"] == metric]
        if not sub.empty and (sub["value"] > 0).any():
            curve_groups(ax, sub, metric, groups, log=True)
            ax.set_yscale("log")
        ax.set_title(f"{metric}: {label}", fontsize=9)
        ax.set_ylabel("relative distance to precise BN (log;\ngeometric mean, 95% CI)")
        epoch_axis(ax)
    return finish(fig, title, notes)


def fig_curves(curves: pd.DataFrame, metrics: Sequence[str] = ("train/acc", "val/acc"),
               title: str = "Training curves: accuracy per epoch", runs: Optional[pd.DataFrame] = None) -> Figure:
    """A generic figure: each metric per epoch (one panel per metric), one line per configuration
    (the params that vary, seeds averaged: mean and 95% CI). `runs` (optional) lets the footnote
    also count runs that logged no point at all."""
    ok = fr.usable_curves(curves)
    notes = footnotes(curves if runs is None else runs, "not averaged")
    present = [m for m in metrics if not ok.empty and (ok["metric"] == m).any()]
    if not present:
        return empty_figure(title, "no finished runs with " + ", ".join(metrics), notes)
    groups = fr.varying(ok.drop_duplicates("run_id"))
    fig, axes = new_figure(len(present), sharey=all(m.endswith("acc") for m in present))
    for ax, metric in zip(axes[0], present):
        curve_groups(ax, ok, metric, groups)
        ax.set_title(metric, fontsize=9)
        ax.set_ylabel(ACC if metric.endswith("acc") else metric)
        epoch_axis(ax)
    n = ok["run_id"].nunique()
    notes.append(f"{n} run(s)")
    return finish(fig, title, notes)


def fig_final_by_key(runs: pd.DataFrame) -> Figure:
    """The default figure of a study without an analysis of its own: for each key the study varies,
    final val/acc and train/acc against that key's values (mean and 95% interval over the runs
    with that value, the other keys pooled; seeds as dots). All runs in one panel where nothing varies."""
    title = "Final accuracy against each key the study varies"
    ok, _, _ = fr.split_runs(runs)
    notes = footnotes(runs, "not averaged")
    if ok.empty:
        return empty_figure(title, "no finished runs", notes)
    keys = fr.varying(ok) or [None]
    fig, axes = new_figure(len(keys), width=4.2, sharey=True)
    for ax, key in zip(axes[0], keys):
        frame = ok.assign(_k=fr.hashable(ok[key]) if key else "all runs")
        values = list(pd.unique(frame["_k"]))
        try:
            values = sorted(values, key=lambda v: (fr.is_missing(v), v))
        except TypeError:  # values of mixed types: as they first appear
            pass
        for j, (metric, color, marker) in enumerate((("val/acc", "tab:red", "o"), ("train/acc", "black", "s"))):
            col = fr.FINAL + metric
            if col not in frame:
                continue
            for i, v in enumerate(values):
                s = frame[fr.same(frame["_k"], v).to_numpy()][col].dropna()
                m, lo, hi, n = S.interval(s, col)
                x = i + (j - 0.5) * 0.2
                ax.errorbar([x], [m], yerr=yerr(m, lo, hi), fmt=marker, color=color, capsize=3, ms=5,
                            label=f"final {metric} (mean, 95% interval)" if i == 0 else "_mean")
                ax.plot([x] * len(s), s, ".", color=color, alpha=0.4, ms=4, label="_seed")
        ax.set_xticks(range(len(values)), [fr.fmt_value(v) for v in values], fontsize=8)
        ax.set_xlabel(key or "")
        ax.set_ylim(0, 1.02)
        chance_line(ax)
    axes[0, 0].set_ylabel("final accuracy")
    if len(keys) > 1:
        notes.append("each panel pools the other keys")
    return finish(fig, title, notes)

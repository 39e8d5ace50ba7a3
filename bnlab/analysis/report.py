"""bnlab-report: every study's figures (PNG + SVG), summary.csv and a REPORT.md whose sections open
with a claim table (claims.py) and whose captions state the findings in numbers (mean and 95%
interval, n seeds), how to reproduce them and the code's git commit.

    bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR] [--force]

Defaults: every known study (bnlab.studies: bnlab's and the project's conf/study/) that has runs, the project's store, <project>/results.
A study section already in DIR is never replaced by one with fewer runs used in the means (a store
with fewer or only failed runs) unless --force is given; each config hash counts once.
"""
from __future__ import annotations

import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from bnlab.analysis import figures as F
from bnlab.analysis.claims import acc as acc_text
from bnlab.analysis.claims import claims_table
from bnlab.analysis.runs import FINAL, StoreNotFound, list_experiments, load_curves, load_runs
from bnlab.config import DIVERGED_LOSS
from bnlab import studies as study_files
from bnlab.tracking import project_home, resolve_uri

KNOWN_STUDIES = ["smoke", "update_ops", "momentum", "batch_size", "lr", "placement", "d2l", "ema_vs_precise",
                 "precise_samples", "norm_batch", "gamma_beta"]
USAGE = "usage: bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR] [--force]"
DPI = 120


# ------------------------------------------------------------------------------ numbers in words

def stat(values) -> str:
    """'0.153 ± 0.021 (n=3)': mean ± 95% t-interval half-width over seeds; no ± for n=1. For an
    accuracy (a Series named like final/val/acc) the logit-scale interval: '0.853 [0.840, 0.866] (n=3)'."""
    if F.is_accuracy(str(getattr(values, "name", "") or "")):
        return acc_text(values, str(values.name))
    m, ci, n = F.mean_ci(values)
    if n == 0:
        return "n/a"
    return f"{m:.3f} ± {ci:.3f} (n={n})" if np.isfinite(ci) else f"{m:.3f} (n={n})"


def _col(frame: pd.DataFrame, metric: str) -> pd.Series:
    return frame[FINAL + metric] if FINAL + metric in frame else pd.Series(dtype=float)


def _fmt_lr(v: float) -> str:
    return f"{v:g}"


def caption_update_ops(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    parts = []
    for v in (False, True):
        s = ok[ok["bn.update_stats"] == v] if "bn.update_stats" in ok else ok.iloc[:0]
        if s.empty:
            continue
        txt = (f"With bn.update_stats={str(v).lower()}, final val/acc in eval mode is {stat(_col(s, 'val/acc'))} "
               f"while train/acc is {stat(_col(s, 'train/acc'))}")
        if FINAL + "val/acc_batch_stats" in s:
            txt += f"; batch statistics give {stat(_col(s, 'val/acc_batch_stats'))}"
        if FINAL + "val/acc_precise_bn" in s:
            txt += f"; precise BN {'restores' if not v else 'gives'} {stat(_col(s, 'val/acc_precise_bn'))}"
        parts.append(txt + ".")
    return " ".join(parts) or "No finished runs."


def _group_finals(curves: pd.DataFrame, metrics: Sequence[str], max_groups: int = 8) -> List[str]:
    """'<group>: metric a, metric b' at each run's last logged step, per config group."""
    ok = F._usable_curves(curves)
    ok = ok[ok["metric"].isin(metrics)] if not ok.empty else ok
    if ok.empty:
        return []
    last = ok.sort_values("step").groupby(["run_id", "metric"]).tail(1)
    wide = last.pivot(index="run_id", columns="metric", values="value")
    meta = ok.drop_duplicates("run_id").set_index("run_id")
    groups = F.varying(meta.reset_index())
    wide = wide.join(meta[groups]) if groups else wide
    out = []
    keys = wide[groups].apply(F._hashable).drop_duplicates() if groups else pd.DataFrame(index=[0])
    for _, key in keys.head(max_groups).iterrows():
        sel = wide
        for c in groups:
            sel = sel[F._same(sel[c].pipe(F._hashable), key[c])]
        vals = ", ".join(f"{m} {stat(sel[m])}" for m in metrics if m in sel)
        out.append(f"{F.group_label(key, groups)}: {vals}")
    if len(keys) > max_groups:
        out.append(f"(and {len(keys) - max_groups} more groups in summary.csv)")
    return out


def caption_running_stats(runs, curves) -> str:
    curves, _, _ = F.running_stats_curves(curves)  # what the figure draws
    lines = _group_finals(curves, ["bnstats/mean_err", "bnstats/var_err"])
    if not lines:
        return "No bnstats/* metrics were logged."
    return "Distance of the running statistics to the precise-BN population statistics at the last epoch: " \
        + "; ".join(lines) + "."


def caption_momentum(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    pts = F.shadow_rows(ok)
    parts = []
    for b in sorted(pts["data.batch_size"].unique()):
        sub = pts[pts["data.batch_size"] == b]
        agg = F.aggregate(sub, ["bn.momentum"], FINAL + "val/acc")
        if agg.empty:
            continue
        best, worst = agg.loc[agg["mean"].idxmax()], agg.loc[agg["mean"].idxmin()]
        txt = (f"batch size {b:g}: best val/acc {_agg(best)} at momentum {F.momentum_label(best['bn.momentum'])}, "
               f"worst {_agg(worst)} at momentum {F.momentum_label(worst['bn.momentum'])}")
        if FINAL + "gap/acc" in sub:
            g = F.aggregate(sub, ["bn.momentum"], FINAL + "gap/acc")
            if not g.empty:
                big = g.loc[g["mean"].idxmax()]
                txt += f"; largest gap {_agg(big)} at momentum {F.momentum_label(big['bn.momentum'])}"
        parts.append(txt)
    shadows = (pts["momentum_source"] == "shadow").any()
    src = (" Momenta other than each run's own bn.momentum come from its shadow running averages "
           "(val/acc_shadow/<m>; training is the same for every momentum).") if shadows else ""
    return "Final eval-mode accuracy per BN momentum (mean ± 95% CI over seeds): " + "; ".join(parts) + "." + src


def _agg(row) -> str:
    ci = row["ci"]
    n = int(row["n"])
    if bool(row.get("bounded", False)) and np.isfinite(row.get("lo", np.nan)):
        return f"{row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}] (n={n})"
    return f"{row['mean']:.3f} ± {ci:.3f} (n={n})" if np.isfinite(ci) else f"{row['mean']:.3f} (n={n})"


def caption_heatmap(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty or FINAL + "gap/acc" not in ok:
        return "No finished runs with gap/acc."
    agg = F.aggregate(F.shadow_rows(ok), ["bn.momentum", "data.batch_size"], FINAL + "gap/acc")
    hi, lo = agg.loc[agg["mean"].idxmax()], agg.loc[agg["mean"].idxmin()]
    return (f"The train−val gap is largest, {_agg(hi)}, at momentum {F.momentum_label(hi['bn.momentum'])} "
            f"and batch size {hi['data.batch_size']:g}, and smallest, {_agg(lo)}, at momentum "
            f"{F.momentum_label(lo['bn.momentum'])} and batch size {lo['data.batch_size']:g} "
            f"({len(agg)} cells).")


def caption_batch_size(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    bn, nobn = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    parts = []
    for b in sorted({ok["data.batch_size"].min(), ok["data.batch_size"].max()}):
        s, n = bn[bn["data.batch_size"] == b], nobn[nobn["data.batch_size"] == b]
        txt = f"at batch size {b:g}, with BN: running statistics {stat(_col(s, 'val/acc'))}"
        if FINAL + "val/acc_batch_stats" in s:
            txt += f", batch statistics {stat(_col(s, 'val/acc_batch_stats'))}"
        if FINAL + "val/acc_precise_bn" in s:
            txt += f", precise BN {stat(_col(s, 'val/acc_precise_bn'))}"
        if not n.empty:
            txt += f"; without BN {stat(_col(n, 'val/acc'))}"
        parts.append(txt)
    out = "Final val/acc " + "; ".join(parts) + "."
    if FINAL + "val/acc_batch_stats_bs1" in bn and bn[FINAL + "val/acc_batch_stats_bs1"].notna().any():
        out += (" Batch statistics from one example per batch give "
                f"{stat(_col(bn, 'val/acc_batch_stats_bs1'))} over all BN runs (chance: {F.CHANCE:g}).")
    return out


def caption_lr(runs, curves) -> str:
    fin = runs[runs["status"].eq("FINISHED")]
    if fin.empty:
        return "No finished runs."
    regions = F.convergence_regions(fin)
    fin = fin.assign(_learned=F.learned(fin))
    parts = []
    for pl, g in fin.groupby("bn.placement"):
        ok = g[~g["diverged"].astype(bool)]
        agg = F.aggregate(ok, ["optim.lr"], FINAL + "val/acc")
        spans = regions.get(str(pl), [])
        reg = " and ".join(f"[{_fmt_lr(lo)}, {_fmt_lr(hi)}]" for lo, hi in spans) or "no learning rate"
        txt = f"{F._variant(pl)}: every seed learns for lr in {reg}"
        # The best rate among those where every seed learned: a mean over the survivors would flatter.
        safe = agg[agg["optim.lr"].map(lambda x: any(lo <= x <= hi for lo, hi in spans))]
        if not safe.empty:
            best = safe.loc[safe["mean"].idxmax()]
            txt += f", where the best val/acc is {_agg(best)} at lr {_fmt_lr(best['optim.lr'])}"
        for what, sel in (("diverged", g["diverged"].astype(bool)),
                          ("stalled (finite loss, no learning)", ~g["diverged"].astype(bool) & ~g["_learned"])):
            per = g[sel].groupby("optim.lr").size()
            if not per.empty:
                txt += f"; {what}: " + ", ".join(f"{k} of {int((g['optim.lr'] == lr).sum())} at lr {_fmt_lr(lr)}"
                                                 for lr, k in per.items())
        parts.append(txt)
    return ("A run learns when its loss stays finite and its final train/acc is at least "
            f"{F.LEARNED:g} (twice chance). " + ". ".join(p[0].upper() + p[1:] for p in parts) + ".")


def caption_placement(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    parts = []
    for act, g in ok.groupby("model.activation"):
        vals = ", ".join(f"{F.PLACEMENT_LABEL.get(pl, pl)} {stat(_col(s, 'val/acc'))}"
                         for pl, s in g.groupby("bn.placement"))
        parts.append(f"{act}: {vals}")
    return "Final val/acc, " + "; ".join(parts) + "."


def caption_curves(runs, curves) -> str:
    lines = _group_finals(curves, ["train/acc", "val/acc"])
    return ("Last-epoch accuracy: " + "; ".join(lines) + ".") if lines else "No finished runs."


def caption_ema_vs_precise(runs, curves) -> str:
    wide = F.step_wide(curves)
    if wide.empty:
        return "No step-level metrics."
    gaps = F.ema_gaps(wide)
    changes = F._lr_changes(wide)
    cut = changes[0] if changes else wide["step"].max() + 1
    parts = []
    for m, g in gaps.groupby("momentum"):
        early = g[g["step"] < cut].groupby("run_id")["gap"].mean()
        late = g[g["step"] > (changes[-1] if changes else cut)].groupby("run_id")["gap"].mean()
        parts.append(f"momentum {m:g}: {stat(early)} before the first decay, {stat(late)} after the last")
    return ("Precise-BN minus EMA val/acc on the step-level subset, averaged per run over the evaluations of each "
            "phase (mean ± 95% CI over runs): " + "; ".join(parts) + ".")


def caption_precise_samples(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    rows = F.precise_size_rows(ok)
    if rows.empty:
        return "No val/acc_precise_bn/<n> metrics."
    parts = [f"{int(n)}: {stat(g['acc'].rename(FINAL + 'val/acc'))}" for n, g in rows.groupby("samples")]
    return ("Precise-BN val/acc by calibration samples: " + "; ".join(parts)
            + f". EMA running statistics: {stat(_col(ok, 'val/acc'))}.")


def caption_norm_batch(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    ok = ok.assign(_norm=F.norm_batch_size(ok), _frozen=F._frozen(ok))
    parts = []
    for (nb, fr), g in ok.groupby(["_norm", "_frozen"]):
        if fr:  # a frozen model's val/acc uses the frozen population statistics it trained with
            parts.append(f"FrozenBN at normalisation batch {nb:g}: train/acc (last epoch frozen) "
                         f"{stat(_col(g, 'train/acc'))}, val/acc with the frozen statistics {stat(_col(g, 'val/acc'))}, "
                         f"with mini-batch statistics {stat(_col(g, 'val/acc_batch_stats'))}")
            continue
        parts.append(f"BN at normalisation batch {nb:g}: train/acc {stat(_col(g, 'train/acc'))}, val/acc with "
                     f"mini-batch statistics {stat(_col(g, 'val/acc_batch_stats'))}, with population statistics "
                     f"{stat(_col(g, 'val/acc_precise_bn'))}, EMA {stat(_col(g, 'val/acc'))}")
    return "Final accuracies: " + "; ".join(parts) + "."


def caption_gamma_beta(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    parts = [f"{act}, bn.affine={str(bool(aff)).lower()}: val/acc {stat(_col(g, 'val/acc'))}, train/acc "
             f"{stat(_col(g, 'train/acc'))}" for (act, aff), g in ok.groupby(["model.activation", "bn.affine"])]
    return "Final accuracies: " + "; ".join(parts) + "."


def caption_d2l_spread(runs, curves) -> str:
    ok, _, _ = F.split_runs(runs)
    if ok.empty:
        return "No finished runs."
    v = ok[FINAL + "val/acc"].dropna()
    p = ok[FINAL + "val/acc_precise_bn"].dropna() if FINAL + "val/acc_precise_bn" in ok else v.iloc[:0]
    return (f"Final val/acc over {len(v)} seeds: running statistics {stat(v)}, range {v.min():.3f}-{v.max():.3f}, "
            f"SD {v.std(ddof=1):.3f}; precise BN {stat(p)}, range {p.min():.3f}-{p.max():.3f}, SD "
            f"{p.std(ddof=1):.3f}; train/acc {stat(_col(ok, 'train/acc'))}. Seed 004 reports 0.878 and 0.796.")


# ------------------------------------------------------------------------------ what each study shows

@dataclass
class FigureSpec:
    name: str
    make: Callable[[pd.DataFrame, pd.DataFrame], object]
    caption: Callable[[pd.DataFrame, pd.DataFrame], str]
    needs: Callable[[pd.DataFrame, pd.DataFrame], bool] = lambda runs, curves: True


def _has_bnstats(runs, curves) -> bool:
    return not curves.empty and curves["metric"].eq("bnstats/mean_err").any()


RUNNING_STATS = FigureSpec("running_stats", lambda r, c: F.fig_running_stats(c, runs=r), caption_running_stats,
                           _has_bnstats)
CURVES = FigureSpec("curves", lambda r, c: F.fig_curves(c, runs=r), caption_curves)
STUDY_FIGURES: Dict[str, List[FigureSpec]] = {
    "update_ops": [FigureSpec("update_ops", lambda r, c: F.fig_update_ops(c, runs=r), caption_update_ops),
                   RUNNING_STATS],
    "momentum": [FigureSpec("momentum", lambda r, c: F.fig_momentum(r), caption_momentum),
                 FigureSpec("momentum_heatmap", lambda r, c: F.fig_momentum_heatmap(r), caption_heatmap),
                 RUNNING_STATS],
    "batch_size": [FigureSpec("batch_size", lambda r, c: F.fig_batch_size(r), caption_batch_size)],
    "lr": [FigureSpec("lr", lambda r, c: F.fig_lr(r), caption_lr)],
    "placement": [FigureSpec("placement", F.fig_placement, caption_placement)],
    "d2l": [FigureSpec("curves", lambda r, c: F.fig_curves(
        c, metrics=("train/acc", "val/acc", "val/acc_precise_bn", "val/acc_batch_stats"),
        title="Dive into Deep Learning 7.5 (LeNet-BN): accuracy per epoch with running, precise and batch statistics",
        runs=r), lambda r, c: "Last-epoch accuracy: " + "; ".join(
            _group_finals(c, ["train/acc", "val/acc", "val/acc_precise_bn", "val/acc_batch_stats"])) + "."),
            FigureSpec("spread", F.fig_d2l_spread, caption_d2l_spread)],
    "ema_vs_precise": [FigureSpec("ema_vs_precise", lambda r, c: F.fig_ema_vs_precise(c, runs=r),
                                  caption_ema_vs_precise)],
    "precise_samples": [FigureSpec("precise_samples", lambda r, c: F.fig_precise_samples(r), caption_precise_samples)],
    "norm_batch": [FigureSpec("norm_batch", lambda r, c: F.fig_norm_batch(r), caption_norm_batch)],
    "gamma_beta": [FigureSpec("gamma_beta", lambda r, c: F.fig_gamma_beta(r), caption_gamma_beta)],
    "smoke": [FigureSpec("curves", lambda r, c: F.fig_curves(
        c, title="Smoke study: the pipeline runs end to end", runs=r), caption_curves)],
}


def figures_for(study: str) -> List[FigureSpec]:
    return STUDY_FIGURES.get(study, [CURVES])


def known_studies() -> List[str]:
    """The built-in studies, then every other study on the config search path (bnlab.studies)."""
    extra = study_files.options("study")
    return KNOWN_STUDIES + [s for s in extra if s not in KNOWN_STUDIES]


def study_question(study: str) -> str:
    """The '# Question:' header of bnlab/conf/study/<study>.yaml (with its continuation lines), if any."""
    return study_files.header(study).get("Question", "")


# ------------------------------------------------------------------------------ tables and text

def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config group (the params that vary, seeds pooled): run counts, then for every
    final/ metric its mean, 95% CI half-width and n over the usable (finished, converged) seeds."""
    groups = F.varying(runs)
    metrics = sorted(c for c in runs.columns if c.startswith(FINAL))
    key = runs[groups].apply(F._hashable) if groups else pd.DataFrame(index=runs.index)
    rows = []
    grouped = key.groupby(groups, dropna=False, sort=True) if groups else [((), key)]
    for k, idx in grouped:
        g = runs.loc[idx.index]
        ok, left, n_div = F.split_runs(g)
        row = dict(zip(groups, k if isinstance(k, tuple) else (k,))) if groups else {}
        row.update(n_runs=len(g), n_seeds=int(ok["seed"].nunique()) if "seed" in ok else len(ok),
                   n_diverged=n_div, left_out=F.left_out_text(left),
                   n_collapsed=int(g["collapsed"].sum()) if "collapsed" in g else 0)
        for m in metrics:
            mean, ci, n = F.mean_ci(ok[m])
            name = m[len(FINAL):]
            row[f"{name}:mean"], row[f"{name}:ci95"], row[f"{name}:n"] = mean, ci, n
        rows.append(row)
    return pd.DataFrame(rows)


def commits_text(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "unknown"
    c = runs["git_commit"].fillna("unknown").astype(str)
    d = runs["git_dirty"].map(lambda v: "uncommitted changes" if v is True else
                              ("clean" if v is False else "dirty flag unknown"))
    if "tags.bnlab.version" in runs:  # an installed bnlab has no commit: its version says which code ran
        none = (c == "unknown") & runs["tags.bnlab.version"].notna()
        c, d = c.where(~none, "bnlab " + runs["tags.bnlab.version"].astype(str)), d.where(~none, "installed")
    counts = pd.DataFrame({"c": c, "d": d}).value_counts()
    return "; ".join(f"`{sha if sha.startswith('bnlab ') else sha[:12]}` ({state}, {n} run{'s' if n != 1 else ''})"
                     for (sha, state), n in counts.items())


def _runs(n: int) -> str:
    return "run" if n == 1 else "runs"


def runs_text(runs: pd.DataFrame) -> str:
    ok, left, n_div = F.split_runs(runs)
    txt = f"{len(runs)} {_runs(len(runs))}, {len(ok)} used in the means. Left out: "
    txt += f"{F.left_out_text(left)} {_runs(sum(left.values()))}" if left else "none"
    if n_div:
        txt += (f". Diverged (finished, loss NaN/inf or above {DIVERGED_LOSS:g}): {n_div} {_runs(n_div)}, "
                "marked in the figures, not averaged")
    dup = int(runs["collapsed"].sum()) if "collapsed" in runs else int(runs.attrs.get("duplicates", 0))
    txt += (f". Each (config group, seed) counted once (the first FINISHED run): {dup} more {_runs(dup)} of a "
            "group and seed already counted collapsed" if dup else ". Collapsed (a group and seed counted once): none")
    return txt + "."


def reproduce_text(study: str) -> str:
    if study in STUDY_FIGURES or study_files.where("study", study):
        return f"`bnlab-train study={study}` then `bnlab-report study={study}`"
    return (f"each run's overrides are in its tag bnlab.overrides (`bnlab-train <overrides> "
            f"tracking.experiment={study}`), then `bnlab-report study={study}`")


# ------------------------------------------------------------------------------ writing

def safe_uri(uri: str) -> str:
    """The URI without a user:password@ part (REPORT.md is committed)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def store_text(uri: str) -> str:
    """The store as REPORT.md shows it: a SQLite file inside the project as sqlite:///<relative
    path> (no machine's absolute path in a committed file), anything else without credentials."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.resolve().relative_to(project_home().resolve()).as_posix()} (in the project)"
        except ValueError:
            return f"sqlite:///.../{path.name} (outside the project)"
    return safe_uri(uri)


def _save(fig, base: Path) -> List[Path]:
    paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=DPI)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: the SVG changes only with the data
    return paths


class Kept(RuntimeError):
    """A study section was left as it is: the store would give fewer runs used in the means."""


def used_in_section(section: Path) -> Optional[int]:
    """Runs used in the means according to an existing section.md, if there is one."""
    if not section.is_file():
        return None
    m = re.search(r"(\d+) used in the means", section.read_text())
    return int(m.group(1)) if m else None


def report_study(study: str, uri: str, out: Path, log=print, force: bool = False) -> Optional[Path]:
    """Figures, summary.csv and section.md of one study in out/<study>/; None if it has no runs.
    Raises Kept (writing nothing) where out/<study> holds a section with more runs used in the
    means than the store gives, unless force."""
    runs = load_runs(study, uri)
    if runs.empty:
        log(f"[{study}] no runs in {safe_uri(uri)}: skipped")
        return None
    folder = out / study
    before, now = used_in_section(folder / "section.md"), len(F.split_runs(runs)[0])
    if before is not None and now < before and not force:
        raise Kept(f"[{study}] kept {folder}: it uses {before} runs in the means, the store gives {now} "
                   f"({runs_text(runs)}); --force replaces it")
    curves = load_curves(study, uri, runs=runs)
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{study}] {runs_text(runs)}")
    summary = summary_table(runs)
    summary.to_csv(folder / "summary.csv", index=False)
    log(f"[{study}] wrote {folder / 'summary.csv'} ({len(summary)} config groups)")
    lines = [f"## {study}", ""] + claims_table(study, runs, curves)
    q = study_question(study)
    if q:
        lines += [f"**Question.** {q}", ""]
    lines += [f"- Runs: {runs_text(runs)}",
              f"- Reproduce: {reproduce_text(study)}",
              f"- Code: {commits_text(runs)}",
              f"- Store: `{store_text(uri)}`, report generated {time.strftime('%Y-%m-%d %H:%M %Z')}",
              f"- Summary per config group: [{study}/summary.csv]({study}/summary.csv)",
              "- Intervals: accuracies on the logit scale, other quantities mean ± t half-width (see the header)", ""]
    failed = 0
    for spec in figures_for(study):
        if not spec.needs(runs, curves):
            log(f"[{study}] {spec.name}: no data for it, skipped")
            continue
        try:
            fig = spec.make(runs, curves)
            caption = spec.caption(runs, curves)
            paths = _save(fig, folder / spec.name)
        except Exception as e:  # one broken figure must not lose the others
            failed += 1
            log(f"[{study}] {spec.name}: FAILED: {e}\n{traceback.format_exc()}")
            lines += [f"### {spec.name}", "", f"Figure could not be drawn: `{e}`", ""]
            continue
        title = " ".join(fig.get_suptitle().split()) or spec.name
        lines += [f"### {title}", "",
                  f"![{spec.name}]({study}/{paths[0].name})", "",
                  f"*{caption}* Vector version: [{study}/{paths[1].name}]({study}/{paths[1].name}).", ""]
        log(f"[{study}] wrote {paths[0]} and {paths[1].name}")
    section = folder / "section.md"
    section.write_text("\n".join(lines))
    _attach(study, uri, folder, log)
    if failed:
        raise RuntimeError(f"{failed} figure(s) of study {study} failed")
    return section


def _attach(study: str, uri: str, folder: Path, log) -> None:
    """The figures and summary.csv also go to the study's latest sweep run (MLflow UI, Artifacts)."""
    from bnlab.tracking import attach_to_latest_sweep

    try:
        run_id = attach_to_latest_sweep(uri, study, folder)
    except Exception as e:  # noqa: BLE001 - a read-only store must not lose the report itself
        log(f"[{study}] could not attach the report to its sweep run: {e}")
        return
    if run_id:
        log(f"[{study}] attached to sweep run {run_id} (artifacts report/)")


def assemble(out: Path, studies_first: Sequence[str]) -> Path:
    """REPORT.md from every out/<study>/section.md (known studies first, in their order)."""
    sections = {p.parent.name: p for p in out.glob("*/section.md")}
    order = [s for s in studies_first if s in sections] + sorted(s for s in sections if s not in studies_first)
    head = ["# bnlab report", "",
            "Generated by `bnlab-report` from the MLflow runs. Every number is a mean over seeds with its 95% "
            f"interval and n the number of seeds (no interval for n = 1). Intervals: {F.CI_METHOD}. In the "
            f"figures, where a group has at most {F.SEED_LINES_MAX_N} seeds each seed is also drawn as a thin line. "
            "Each study section opens with a table: the claim and its source, what bnlab measured, and whether "
            "they agree by the rule stated in the row (sections without an 'Intervals' line were written by an "
            "earlier bnlab-report: mean ± the 95% t half-width for every quantity, and no claim table). Runs that "
            "failed, were killed or are still running are left out and counted; diverged runs are marked "
            "in the figures and not averaged. Each section gives the command that reproduces it and the "
            "git commit of its runs.", ""]
    body = [sections[s].read_text() for s in order]
    report = out / "REPORT.md"
    report.write_text("\n".join(head + body))
    return report


def parse_args(argv: Sequence[str]) -> Dict[str, str]:
    args: Dict[str, str] = {}
    for a in argv:
        if a == "--force":
            args["force"] = "true"
            continue
        key, sep, value = a.partition("=")
        if not sep or key not in ("study", "tracking.uri", "out"):
            raise ValueError(f"unknown argument {a!r}")
        args[key] = value
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """bnlab-report [study=NAME[,NAME...]] [tracking.uri=URI] [out=DIR]"""
    import matplotlib

    matplotlib.use("Agg")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"bnlab-report: {e}\n{USAGE}", file=sys.stderr)
        return 2
    uri = resolve_uri(args.get("tracking.uri") or None)
    out = Path(args["out"]).expanduser().resolve() if args.get("out") else project_home() / "results"
    inside = study_files.installed_location(out)
    if inside:
        print(f"bnlab-report: out={out} is inside {inside}; run bnlab-report in your project folder "
              f"(or set BNLAB_HOME, or out=DIR)", file=sys.stderr)
        return 2
    known = known_studies()
    try:
        if args.get("study"):
            studies = [s for s in args["study"].split(",") if s]
            unknown = [s for s in studies if s not in known]
            if unknown:
                # An experiment that is not a study (tracking.experiment=NAME) may be reported too.
                try:
                    exps = set(list_experiments(uri)["name"]) - {"Default"}
                except StoreNotFound:
                    exps = set()
                unknown = [s for s in unknown if s not in exps]
                if unknown:
                    extra = f"; other experiments in the store: {', '.join(sorted(exps - set(known)))}" \
                        if exps - set(known) else ""
                    print(f"bnlab-report: unknown study {', '.join(map(repr, unknown))}; studies: "
                          f"{', '.join(known)}{extra}", file=sys.stderr)
                    return 2
        else:
            exps = list_experiments(uri)
            have = set(exps.loc[exps["n_runs"] > 0, "name"])
            studies = [s for s in known if s in have]
            others = sorted(have - set(known) - {"Default"})
            if others:
                print(f"bnlab-report: also in the store (not studies; `bnlab-report study=NAME`): {', '.join(others)}")
            if not studies:
                print(f"bnlab-report: no study has runs in {uri}")
                return 0
    except StoreNotFound as e:
        print(f"bnlab-report: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unreachable server, a store of an unknown schema
        print(f"bnlab-report: cannot read the runs in {safe_uri(uri)}: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    print(f"bnlab-report: studies {', '.join(studies)} from {safe_uri(uri)} -> {out}")
    errors = 0
    written = 0
    for study in studies:
        try:
            written += report_study(study, uri, out, force=bool(args.get("force"))) is not None
        except Kept as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            errors += 1
        except StoreNotFound as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            return 1
        except RuntimeError as e:
            print(f"bnlab-report: {e}", file=sys.stderr)
            errors += 1
    if written:
        print(f"bnlab-report: wrote {assemble(out, known)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

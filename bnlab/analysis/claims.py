"""Each study's claims (from the seed texts and Wu & Johnson 2021) next to what bnlab measured: the
rows of the table "claim (source) / bnlab measured / agrees?" that opens a study's report section.
Every verdict comes from the runs by the rule printed with it; no number here is typed in by hand
except the claims' own (the sources' figures)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd

from bnlab.analysis import figures as F

FINAL = F.FINAL


@dataclass
class Claim:
    claim: str  # what the source says, with the source
    measured: str  # what bnlab measured (numbers with n and intervals)
    agrees: str  # "yes", "no", "partly" or "no data", then the rule that decided


def acc(values, name: str = FINAL + "val/acc") -> str:
    """'0.853 [0.840, 0.866] (n=3)': mean and the 95% interval of the report header."""
    m, lo, hi, n = F.interval(pd.Series(values, dtype=float).dropna(), name)
    if n == 0:
        return "n/a"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}] (n={n})" if np.isfinite(lo) else f"{m:.3f} (n={n})"


def diff(values) -> tuple:
    """(mean, low, high, n) of a per-seed difference: mean ± the 95% t half-width."""
    m, ci, n = F.mean_ci(pd.Series(values, dtype=float).dropna())
    return m, m - ci, m + ci, n


def diff_text(values, unit: str = "") -> str:
    m, lo, hi, n = diff(values)
    if n == 0:
        return "n/a"
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{unit} (n={n})" if np.isfinite(lo) else f"{m:+.3f}{unit} (n={n})"


def verdict(ok: Optional[bool], rule: str) -> str:
    word = "no data" if ok is None else ("yes" if ok else "no")
    return f"{word} (rule: {rule})"


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return F.split_runs(runs)[0]


def _paired(a: pd.DataFrame, b: pd.DataFrame, col_a: str, col_b: str) -> pd.Series:
    """Per seed: a[col_a] - b[col_b] (seeds present in both)."""
    x = a.set_index("seed")[col_a] if col_a in a else pd.Series(dtype=float)
    y = b.set_index("seed")[col_b] if col_b in b else pd.Series(dtype=float)
    return (x - y).dropna()


# ------------------------------------------------------------------------------ per study

def claims_d2l(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty:
        return []
    v = ok[FINAL + "val/acc"].dropna()
    p = ok.get(FINAL + "val/acc_precise_bn", pd.Series(dtype=float)).dropna()
    t = ok[FINAL + "train/acc"].dropna()
    out = [Claim("LeNet-BN reaches test accuracy 0.878 after 10 epochs (seed 004, d2l 7.5, its from-scratch BN, one run)",
                 f"final val/acc with running statistics {acc(v)}, range {v.min():.3f}-{v.max():.3f} over seeds",
                 verdict(bool(v.min() <= 0.878 <= v.max()), "0.878 inside the range of the seeds")),
           Claim("... with train accuracy 0.908 (seed 004)",
                 f"final train/acc {acc(t, FINAL + 'train/acc')}, range {t.min():.3f}-{t.max():.3f}",
                 verdict(bool(abs(t.mean() - 0.908) <= 0.01), "mean within 0.01 of 0.908"))]
    # 0.796: the same settings with the framework's BN, and the same train acc 0.908.
    okc = F._usable_curves(curves)
    late = okc[(okc["metric"] == "val/acc") & (okc["step"] >= okc["step"].max() - 2)] if not okc.empty else okc
    sd_run, sd_pre, sd_train = v.std(ddof=1), p.std(ddof=1) if len(p) > 1 else float("nan"), t.std(ddof=1)
    # Two independent runs differ by sqrt(2) x SD on average scale: how many such SDs is 0.878 - 0.796?
    z = (0.878 - 0.796) / (np.sqrt(2) * sd_run) if sd_run > 0 else float("nan")
    measured = (f"seed-to-seed SD of the final val/acc: {sd_run:.3f} with running statistics, {sd_pre:.3f} with "
                f"precise BN, {sd_train:.3f} of train/acc; two runs then differ with SD {np.sqrt(2) * sd_run:.3f}, "
                f"so 0.878 − 0.796 = 0.082 is {z:.1f} such SDs (with precise BN: "
                f"{(0.082 / (np.sqrt(2) * sd_pre)) if sd_pre > 0 else float('nan'):.1f}); lowest val/acc of any seed "
                f"in the last 3 epochs {late['value'].min() if not late.empty else float('nan'):.3f}")
    ok_rule = bool(np.isfinite(sd_pre) and sd_run >= 2 * sd_pre and sd_train <= 0.005)
    out.append(Claim("The same network with the framework's BN and identical settings scores 0.796 with the same "
                     "train acc 0.908 (seed 004). bnlab's reading: the test-time running statistics, not training, "
                     "make the difference",
                     measured,
                     verdict(ok_rule, "running-statistics SD >= 2x precise-BN SD while train/acc SD <= 0.005")))
    if len(p):
        gain = _paired(ok, ok, FINAL + "val/acc_precise_bn", FINAL + "val/acc")
        m, lo, hi, n = diff(gain)
        out.append(Claim("Recomputing the statistics (precise BN) repairs the eval-mode accuracy ('BN: the untold "
                         "story', seed 003; Wu & Johnson 2021)",
                         f"precise BN {acc(p, FINAL + 'val/acc_precise_bn')}; precise − running per seed {diff_text(gain)}",
                         verdict(bool(np.isfinite(lo) and lo > 0), "95% CI of the paired gain above 0")))
    return out


def claims_ema_vs_precise(runs, curves) -> List[Claim]:
    wide = F.step_wide(curves)
    if wide.empty:
        return []
    gaps = F.ema_gaps(wide)
    own = gaps[gaps["momentum"].round(9).isin(wide["bn.momentum"].round(9).unique())] if "bn.momentum" in wide else gaps
    changes = F._lr_changes(wide)
    if not changes or own.empty:
        return []
    first, last = changes[0], changes[-1]
    hi_lr = own[own["step"] < first].groupby("run_id")["gap"].mean()
    lo_lr = own[own["step"] > last].groupby("run_id")["gap"].mean()
    m_hi, lo_hi, _, _ = diff(hi_lr)
    m_lo, _, hi_lo, _ = diff(lo_lr)
    mom = float(wide["bn.momentum"].iloc[0]) if "bn.momentum" in wide else float("nan")
    out = [Claim("While the learning rate is high, the EMA statistics lag the weights: precise BN beats them "
                 "(Wu & Johnson 2021, sec. 3)",
                 f"precise − EMA(momentum {mom:g}) val/acc, averaged over the evaluations before the first decay "
                 f"(step {first:g}): {diff_text(hi_lr)} per run",
                 verdict(bool(np.isfinite(lo_hi) and lo_hi > 0), "95% CI above 0")),
           Claim("... and the gap closes after the learning rate decays (Wu & Johnson 2021)",
                 f"after the last decay (step {last:g}): {diff_text(lo_lr)}",
                 verdict(bool(np.isfinite(hi_lo) and abs(m_lo) < 0.25 * max(m_hi, 1e-9) and hi_lo < max(m_hi, 0)),
                         "late mean below a quarter of the early mean, late CI below the early mean"))]
    # Smaller momenta: larger early gaps (stale statistics), from the shadows.
    early = gaps[gaps["step"] < first].groupby("momentum")["gap"].mean().sort_index()
    if len(early) >= 3:
        mono = bool((np.diff(early.to_numpy()) <= 0.005).all())
        out.append(Claim("A smaller EMA momentum is staler while the weights move fast (seed 000: the decay matters "
                         "for validation)",
                         "mean early gap by momentum: " + ", ".join(f"{m:g}: {g:+.3f}" for m, g in early.items()),
                         verdict(mono, "the early gap does not grow with the momentum (tolerance 0.005)")))
    return out


def claims_precise_samples(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    rows = F.precise_size_rows(ok)
    if rows.empty:
        return []
    full = rows["samples"].max()
    ref = rows[rows["samples"] == full].set_index("seed")["acc"]
    out = []

    def gap(n):
        r = rows[rows["samples"] == n].set_index("seed")["acc"]
        return (r - ref).dropna()

    mid = sorted(n for n in rows["samples"].unique() if 1e3 <= n <= 1e4)
    txt = "; ".join(f"{int(n)}: {diff_text(gap(n))}" for n in mid)
    within = [n for n in mid if abs(diff(gap(n))[0]) <= 0.005]
    out.append(Claim("10^3-10^4 calibration samples suffice for precise BN (Wu & Johnson 2021, sec. 3)",
                     f"val/acc minus val/acc with all {int(full)} samples, per seed: {txt}",
                     verdict(bool(within), "some size in [10^3, 10^4] within 0.005 of the full set on average")
                     + (f"; from {int(min(within))} samples on" if within else "")))
    small = rows["samples"].min()
    m, lo, hi, n = diff(gap(small))
    out.append(Claim("Too few samples give noisy population statistics (Wu & Johnson 2021: small calibration sets "
                     "hurt)",
                     f"{int(small)} samples: {diff_text(gap(small))} against the full set",
                     verdict(bool(np.isfinite(hi) and hi < 0), "95% CI below 0")))
    if FINAL + "val/acc" in ok:
        g = _paired(ok, ok, FINAL + "val/acc_precise_bn", FINAL + "val/acc")
        out.append(Claim("Precise BN beats the EMA statistics when the weights still move fast (lr 1.0; 'BN: the "
                         "untold story', seed 003)",
                         f"precise BN ({int(ok['bn.precise_samples'].iloc[0])} samples) − EMA per seed: {diff_text(g)}",
                         verdict(bool(np.isfinite(diff(g)[1]) and diff(g)[1] > 0), "95% CI above 0")))
    return out


def claims_norm_batch(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty:
        return []
    ok = ok.assign(_norm=F.norm_batch_size(ok), _frozen=F._frozen(ok))
    plain, frozen = ok[~ok["_frozen"]], ok[ok["_frozen"]]
    sizes = sorted(plain["_norm"].unique())
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    ps, pb = plain[plain["_norm"] == small], plain[plain["_norm"] == big]
    pop = FINAL + "val/acc_precise_bn"
    out = []
    d = _paired(pb, ps, pop, pop)
    out.append(Claim("Small normalisation batches lower the accuracy with population statistics (Wu & Johnson 2021, "
                     "Fig. 2)",
                     f"val/acc with population statistics: normalisation batch {small:g}: {acc(ps[pop], pop)}, "
                     f"{big:g}: {acc(pb[pop], pop)}",
                     verdict(bool(np.isfinite(diff(d)[1]) and diff(d)[1] > 0), f"paired gain {big:g} vs {small:g} "
                             f"{diff_text(d)}, 95% CI above 0")))
    inc = _paired(ps, ps, FINAL + "val/acc_batch_stats", pop)
    out.append(Claim("At small normalisation batches validation with mini-batch statistics beats validation with "
                     "population statistics: a train-test inconsistency (Wu & Johnson 2021, sec. 4)",
                     f"batch {small:g}: mini-batch − population statistics per seed {diff_text(inc)}; at {big:g}: "
                     f"{diff_text(_paired(pb, pb, FINAL + 'val/acc_batch_stats', pop))}",
                     verdict(bool(np.isfinite(diff(inc)[1]) and diff(inc)[1] > 0), "95% CI above 0 at the smallest batch")))
    if not frozen.empty:
        fs = frozen[frozen["_norm"] == small]
        g = _paired(fs, ps, FINAL + "val/acc", pop)
        out.append(Claim("FrozenBN (training the last epochs with fixed population statistics) repairs the "
                         "inconsistency of small normalisation batches (Wu & Johnson 2021, sec. 4)",
                         f"batch {small:g}: FrozenBN val/acc {acc(fs[FINAL + 'val/acc'])} against ordinary BN with "
                         f"population statistics {acc(ps[pop], pop)}; paired {diff_text(g)}",
                         verdict(bool(np.isfinite(diff(g)[1]) and diff(g)[1] > 0), "95% CI of the paired gain above 0")))
    return out


def claims_gamma_beta(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty or "bn.affine" not in ok:
        return []
    out = []
    for act in sorted(ok["model.activation"].unique()):
        a = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == True)]  # noqa: E712 (nullable bool)
        b = ok[(ok["model.activation"] == act) & (ok["bn.affine"] == False)]  # noqa: E712
        g = _paired(a, b, FINAL + "val/acc", FINAL + "val/acc")
        m, lo, hi, n = diff(g)
        src = ("without gamma and beta a sigmoid after BN works in its near-linear range, so the network loses "
               "non-linearity (seed 002, citing Ioffe & Szegedy)" if act == "sigmoid" else
               "gamma and beta let each layer choose the scale and shift its non-linearity sees (seed 002)")
        out.append(Claim(f"{act}: learned gamma and beta beat fixed ones: {src}",
                         f"val/acc learned {acc(a[FINAL + 'val/acc'])}, fixed {acc(b[FINAL + 'val/acc'])}; "
                         f"learned − fixed per seed {diff_text(g)}",
                         verdict(bool(np.isfinite(lo) and lo > 0), "95% CI of the paired difference above 0")))
    return out


def claims_momentum(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty:
        return []
    pts = F.shadow_rows(ok)
    bs = pts["data.batch_size"].max()
    sub = pts[pts["data.batch_size"] == bs]

    def at(m, col=FINAL + "val/acc"):
        return sub[np.isclose(sub["bn.momentum"].astype(float).fillna(-1), m)].set_index("seed")[col]

    out = []
    if len(at(0.001)) and len(at(0.1)):
        n_train = ok["data.train_subset"].dropna().iloc[0] if "data.train_subset" in ok and \
            ok["data.train_subset"].notna().any() else 60000
        steps = int(ok.loc[ok["data.batch_size"] == bs, "train.epochs"].iloc[0]) * (int(n_train) // int(bs))
        d = (at(0.1) - at(0.001)).dropna()
        gd = (at(0.001, FINAL + "gap/acc") - at(0.1, FINAL + "gap/acc")).dropna()
        out.append(Claim("Good training but poor validation? Lower the decay to about 0.9 (momentum 0.1): a decay "
                         "near 1 (momentum 0.001) averages too slowly (seed 000, quoting TensorFlow)",
                         f"batch {bs:g} ({steps} steps, momentum x steps = {0.001 * steps:.2f} for 0.001): val/acc "
                         f"momentum 0.1 {acc(at(0.1))} vs 0.001 {acc(at(0.001))}; paired {diff_text(d)}; gap/acc "
                         f"grows by {diff_text(gd)}",
                         verdict(bool(np.isfinite(diff(d)[1]) and diff(d)[1] > 0), "95% CI of the paired gain above 0")))
    if len(at(1.0)) and len(at(0.1)):
        d = (at(0.1) - at(1.0)).dropna()
        out.append(Claim("Momentum 1 in PyTorch's convention (decay 0: the last batch's statistics only) is biased and "
                         "hurts validation (seed 000)",
                         f"batch {bs:g}: val/acc momentum 0.1 {acc(at(0.1))} vs 1.0 {acc(at(1.0))}; paired {diff_text(d)}",
                         verdict(bool(np.isfinite(diff(d)[1]) and diff(d)[1] > 0), "95% CI of the paired gain above 0")))
    return out


def claims_update_ops(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty or "bn.update_stats" not in ok:
        return []
    off, on = ok[ok["bn.update_stats"] == False], ok[ok["bn.update_stats"] == True]  # noqa: E712
    out = []
    if not off.empty:
        tr, va = off[FINAL + "train/acc"], off[FINAL + "val/acc"]
        out.append(Claim("Without TensorFlow's update ops the model trains well but fails in eval mode: 'good "
                         "training, bad validation' (seed 000)",
                         f"bn.update_stats=false: train/acc {acc(tr, FINAL + 'train/acc')}, eval-mode val/acc {acc(va)}",
                         verdict(bool(tr.mean() >= 0.6 and va.mean() <= 0.3), "train/acc >= 0.6 and val/acc <= 0.3")))
        if FINAL + "val/acc_precise_bn" in off and not on.empty:
            p = off[FINAL + "val/acc_precise_bn"]
            out.append(Claim("Recomputing the population statistics after training repairs it ('BN: the untold "
                             "story', seed 003)",
                             f"bn.update_stats=false with precise BN {acc(p, FINAL + 'val/acc_precise_bn')} against "
                             f"ordinary BN's eval-mode val/acc {acc(on[FINAL + 'val/acc'])}",
                             verdict(bool(p.mean() >= on[FINAL + "val/acc"].mean() - 0.02),
                                     "within 0.02 of ordinary BN or above")))
    col = FINAL + "val/acc_batch_stats_bs1"
    if col in ok and ok[col].notna().any():
        out.append(Claim("Testing one example at a time in training mode outputs beta from every BN and destroys test "
                         "accuracy (seed 000)",
                         f"val/acc with batch statistics of one example {acc(ok[col], col)} (chance {F.CHANCE:g})",
                         verdict(bool(ok[col].mean() <= 2 * F.CHANCE), "mean at most twice chance")))
    return out


def claims_placement(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty or "bn.placement" not in ok:
        return []
    out = []
    for act in sorted(ok["model.activation"].unique()):
        g = ok[ok["model.activation"] == act]
        before, after, none = (g[g["bn.placement"] == p] for p in ("before_act", "after_act", "none"))
        if not before.empty and not none.empty:
            d = _paired(before, none, FINAL + "val/acc", FINAL + "val/acc")
            out.append(Claim(f"{act}: BN improves training of LeNet at the same settings (seed 004, d2l 7.5; "
                             "Ioffe & Szegedy)",
                             f"val/acc BN before the activation {acc(before[FINAL + 'val/acc'])}, no BN "
                             f"{acc(none[FINAL + 'val/acc'])}; paired {diff_text(d)}",
                             verdict(bool(np.isfinite(diff(d)[1]) and diff(d)[1] > 0), "95% CI of the paired gain above 0")))
        if not before.empty and not after.empty:
            d = _paired(before, after, FINAL + "val/acc", FINAL + "val/acc")
            m, lo, hi, n = diff(d)
            out.append(Claim(f"{act}: BN belongs before the non-linearity (Ioffe & Szegedy 2015; d2l 7.5)",
                             f"val/acc before {acc(before[FINAL + 'val/acc'])}, after {acc(after[FINAL + 'val/acc'])}; "
                             f"before − after {diff_text(d)}",
                             verdict(bool(np.isfinite(lo) and lo > 0), "95% CI of before − after above 0")
                             + ("; the CI includes 0: no measurable difference" if np.isfinite(lo) and lo <= 0 <= hi else "")))
    return out


def claims_batch_size(runs, curves) -> List[Claim]:
    ok = _ok(runs)
    if ok.empty or "bn.placement" not in ok:
        return []
    bn, plain = ok[ok["bn.placement"] != "none"], ok[ok["bn.placement"] == "none"]
    out = []
    col = FINAL + "val/acc_batch_stats_bs1"
    if col in bn and bn[col].notna().any():
        out.append(Claim("Testing one example at a time in training mode outputs beta from every BN: chance accuracy "
                         "whatever the training batch size (seed 000)",
                         f"val/acc with batch statistics of one example {acc(bn[col], col)} over every BN run "
                         f"(chance {F.CHANCE:g})",
                         verdict(bool(bn[col].mean() <= 2 * F.CHANCE), "mean at most twice chance")))
    if FINAL + "val/acc_precise_bn" in bn:
        per = {b: _paired(g, g, FINAL + "val/acc_precise_bn", FINAL + "val/acc")
               for b, g in bn.groupby("data.batch_size")}
        worst = min(per, key=lambda b: diff(per[b])[0])
        out.append(Claim("Precise BN is at least as good as the EMA running statistics (Wu & Johnson 2021, sec. 3)",
                         "precise − running per seed, by batch size: "
                         + ", ".join(f"{b:g}: {diff(d)[0]:+.3f}" for b, d in per.items())
                         + f"; lowest at batch {worst:g}: {diff_text(per[worst])}",
                         verdict(bool(all(diff(d)[0] >= -0.005 for d in per.values())),
                                 "mean difference >= -0.005 at every batch size")))
    if not plain.empty:
        big = ok["data.batch_size"].max()
        a, b = bn[bn["data.batch_size"] == big], plain[plain["data.batch_size"] == big]
        d = _paired(a, b, FINAL + "val/acc", FINAL + "val/acc")
        out.append(Claim("BN lets a network train at settings where the plain one does not (seed 004, d2l 7.5; "
                         "Ioffe & Szegedy)",
                         f"batch {big:g} at the same lr and epochs: with BN {acc(a[FINAL + 'val/acc'])}, without "
                         f"{acc(b[FINAL + 'val/acc'])}; paired {diff_text(d)}",
                         verdict(bool(np.isfinite(diff(d)[1]) and diff(d)[1] > 0), "95% CI of the paired gain above 0")))
    return out


def claims_lr(runs, curves) -> List[Claim]:
    fin = runs[runs["status"].eq("FINISHED")] if not runs.empty else runs
    if fin.empty or "optim.lr" not in fin:
        return []
    regions = F.convergence_regions(fin)

    def top(pl):
        spans = regions.get(pl, [])
        return max((hi for _, hi in spans), default=float("nan"))

    def text(pl):
        spans = regions.get(pl, [])
        return " and ".join(f"[{lo:g}, {hi:g}]" for lo, hi in spans) or "none"

    bn, none = top("before_act"), top("none")
    return [Claim("BN allows much larger learning rates: a wider region of convergence (Ioffe & Szegedy; d2l 7.5 "
                  "exercise 2, seed 004)",
                  f"learning rates where every seed learns (finite loss, train/acc >= {F.LEARNED:g}): with BN "
                  f"{text('before_act')}, without {text('none')}",
                  verdict(bool(np.isfinite(bn) and (not np.isfinite(none) or bn > none)),
                          "the largest such rate is larger with BN"))]


CLAIMS: Dict[str, Callable[[pd.DataFrame, pd.DataFrame], List[Claim]]] = {
    "d2l": claims_d2l, "ema_vs_precise": claims_ema_vs_precise, "precise_samples": claims_precise_samples,
    "norm_batch": claims_norm_batch, "gamma_beta": claims_gamma_beta, "momentum": claims_momentum,
    "update_ops": claims_update_ops, "placement": claims_placement, "batch_size": claims_batch_size,
    "lr": claims_lr,
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_table(study: str, runs: pd.DataFrame, curves: pd.DataFrame) -> List[str]:
    """Markdown lines of the study's claim table ([] where the study has no claims registered)."""
    fn = CLAIMS.get(study)
    if fn is None:
        return []
    try:
        rows = fn(runs, curves)
    except Exception as e:  # a claim that cannot be computed is reported, never hidden
        return [f"*Claims could not be computed: `{e}`*", ""]
    if not rows:
        return ["*Claims: no data to test them yet.*", ""]
    lines = ["| claim (source) | bnlab measured | agrees? |", "|---|---|---|"]
    lines += [f"| {_cell(c.claim)} | {_cell(c.measured)} | {_cell(c.agrees)} |" for c in rows]
    return lines + [""]

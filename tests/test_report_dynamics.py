"""The dynamics studies end to end on a small store: tiny real train() runs of each new study
(synthetic data) logged to a temporary SQLite store, then the figures, claim tables and report
sections drawn from it; and the accuracy intervals that never leave [0, 1]."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bnlab.analysis import claims as C
from bnlab.analysis import figures as F
from bnlab.analysis import report, runs as R
from bnlab.config import (Activation, BNConfig, Config, DataConfig, DataName, ModelConfig, OptimConfig,
                          Schedule, TrainConfig)
from bnlab.tracking import MlflowTracker
from bnlab.train import train


def _cfg(seed, study, bn=None, optim=None, model=None, epochs=2, **train_kw):
    cfg = Config(seed=seed,
                 data=DataConfig(name=DataName.synthetic, synthetic_train=256, synthetic_val=128, batch_size=32),
                 model=model or ModelConfig(), bn=bn or BNConfig(precise_samples=128), optim=optim or OptimConfig(lr=0.5),
                 train=TrainConfig(epochs=epochs, threads=1, bs1_samples=0, progress=False, **train_kw))
    cfg.__post_init__()
    cfg.tracking.experiment = cfg.tracking.study = study
    return cfg


def _configs():
    for seed in (0, 1):
        yield _cfg(seed, "ema_vs_precise", bn=BNConfig(precise_samples=128, shadow_momenta=[0.01, 0.3]),
                   optim=OptimConfig(lr=0.5, schedule=Schedule.step, milestones=[2], gamma=0.1), epochs=3,
                   eval_every=4, eval_subset=64)
        yield _cfg(seed, "precise_samples", bn=BNConfig(precise_samples=128, precise_sizes=[16, 64, 256]))
        yield _cfg(seed, "d2l")
        for g in (4, None):
            for f in (None, 2):
                yield _cfg(seed, "norm_batch", bn=BNConfig(precise_samples=128, ghost_batch_size=g, freeze_at=f))
        for aff in (True, False):
            for act in (Activation.sigmoid, Activation.relu):
                yield _cfg(seed, "gamma_beta", bn=BNConfig(precise_samples=128, affine=aff),
                           model=ModelConfig(activation=act), epochs=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("BNLAB_HOME")
    os.environ["BNLAB_HOME"] = str(home)
    uri = f"sqlite:///{home / 'runs' / 'mlflow.db'}"
    try:
        for cfg in _configs():
            train(cfg, MlflowTracker(uri, cfg.tracking.experiment, f"seed={cfg.seed}"),
                  extra_tags={"bnlab.study": cfg.tracking.study})
        yield uri
    finally:
        if old is None:
            os.environ.pop("BNLAB_HOME", None)
        else:
            os.environ["BNLAB_HOME"] = old


def frames(uri, study):
    runs = R.load_runs(study, uri)
    return runs, R.load_curves(study, uri, runs=runs)


def lines(ax, seeds=False):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) and (ln.get_label() == "_seed") == seeds
            and not ln.get_label().startswith("chance")]


# ------------------------------------------------------------------------------ intervals

def test_accuracy_intervals_stay_inside_0_1_and_others_do_not_need_to():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 6))
        v = np.clip(rng.uniform(0.0, 1.0) + rng.normal(0, 0.3, n), 0, 1)
        lo, hi = F.acc_interval(v)
        assert 0 <= lo <= hi <= 1
        m, lo2, hi2, _ = F.interval(pd.Series(v, name="final/val/acc"))
        assert (lo2, hi2) == (lo, hi)
    # the case: an accuracy near 1 with a wide spread; the t-interval of raw values passes 1
    v = [0.5, 0.97, 0.99]
    m, ci, _ = F.mean_ci(v)
    assert m + ci > 1 and F.acc_interval(v)[1] < 1
    # a difference of accuracies keeps the symmetric t-interval
    m, lo, hi, _ = F.interval(pd.Series(v, name="final/gap/acc"))
    assert hi == pytest.approx(m + ci)
    agg = F.aggregate(pd.DataFrame({"g": [1, 1, 1], "final/val/acc": v}), ["g"], "final/val/acc")
    assert agg["bounded"].all() and agg["hi"].iloc[0] < 1 and agg["lo"].iloc[0] > 0


# ------------------------------------------------------------------------------ step-level data

def test_step_level_metrics_load_at_global_steps(store):
    runs, curves = frames(store, "ema_vs_precise")
    step = curves[curves["metric"] == "step/val/acc"]
    # 256 / 32 = 8 steps per epoch, 3 epochs, every 4 steps: 4, 8, ..., 24
    assert sorted(step["step"].unique()) == list(range(4, 25, 4))
    assert sorted(curves.loc[curves["metric"] == "val/acc", "step"].unique()) == [1, 2, 3]
    wide = F.step_wide(curves)
    assert len(wide) == 2 * 6 and {"step/lr", "step/val/acc_precise_bn", "step/val/acc_shadow/0.01"} <= set(wide)
    assert F._lr_changes(wide) == [20.0]  # milestone 2: the first step of epoch 3 is step 17; logged at 20
    gaps = F.ema_gaps(wide)
    assert set(gaps["momentum"].round(6)) == {0.01, 0.1, 0.3}
    row = wide.iloc[0]
    g = gaps[(gaps["run_id"] == row["run_id"]) & (gaps["step"] == row["step"]) & np.isclose(gaps["momentum"], 0.1)]
    assert g["gap"].iloc[0] == pytest.approx(row["step/val/acc_precise_bn"] - row["step/val/acc"])


# ------------------------------------------------------------------------------ figures

def test_fig_ema_vs_precise(store):
    runs, curves = frames(store, "ema_vs_precise")
    fig = F.fig_ema_vs_precise(curves, runs=runs)
    top = fig.axes[0]
    labels = {ln.get_label() for ln in lines(top)}
    assert {"precise BN (population statistics)", "EMA, momentum 0.1", "EMA, momentum 0.01"} <= labels
    assert all(len(ln.get_xdata()) == 6 for ln in lines(top) if ln.get_label() != "learning-rate decay")
    assert len(lines(top, seeds=True)) == 2 * 2  # precise and the own EMA, 2 seeds each
    assert any(ax.get_yscale() == "log" for ax in fig.axes)  # the learning rate


def test_fig_precise_samples(store):
    runs, _ = frames(store, "precise_samples")
    fig = F.fig_precise_samples(runs)
    ax = fig.axes[0]
    main = [ln for ln in lines(ax) if ln.get_label() == "precise BN (val/acc)"]
    assert len(main) == 1 and list(main[0].get_xdata()) == [16, 64, 256]
    assert len(lines(ax, seeds=True)) == 2
    rows = F.precise_size_rows(F.split_runs(runs)[0])
    assert main[0].get_ydata()[0] == pytest.approx(rows[rows["samples"] == 16]["acc"].mean())


def test_fig_norm_batch_and_gamma_beta(store):
    runs, _ = frames(store, "norm_batch")
    fig = F.fig_norm_batch(runs)
    left, right = fig.axes[:2]
    assert {"train/acc, mini-batch statistics", "val/acc, mini-batch statistics",
            "val/acc, population statistics (precise BN)"} <= {ln.get_label() for ln in lines(left)}
    assert all(list(ln.get_xdata()) == [4, 32] for ln in lines(left))  # ghost 4 and the whole batch
    assert "FrozenBN" in right.get_title()
    runs, _ = frames(store, "gamma_beta")
    fig = F.fig_gamma_beta(runs)
    assert len(fig.axes) == 2 and all(len(ax.patches) == 2 for ax in fig.axes)
    ok = F.split_runs(runs)[0]
    sig = ok[(ok["model.activation"] == "sigmoid") & ok["bn.affine"]]
    bar = fig.axes[[a.get_title() for a in fig.axes].index("model.activation=sigmoid")].patches[0]
    assert bar.get_height() == pytest.approx(sig["final/val/acc"].mean())


def test_fig_d2l_spread(store):
    runs, curves = frames(store, "d2l")
    fig = F.fig_d2l_spread(runs, curves)
    ax = fig.axes[0]
    dots = [ln for ln in ax.get_lines() if ln.get_label().startswith("final val/acc")]
    assert len(dots) == 3 and all(len(d.get_ydata()) == 2 for d in dots)
    assert sorted(ln.get_ydata()[0] for ln in ax.get_lines() if "seed 004" in ln.get_label()) == [0.796, 0.878]


# ------------------------------------------------------------------------------ claims and report

def test_claims_are_computed_from_the_runs(store):
    runs, curves = frames(store, "gamma_beta")
    rows = C.claims_gamma_beta(runs, curves)
    assert len(rows) == 2
    ok = F.split_runs(runs)[0]
    for row, act in zip(rows, ["relu", "sigmoid"]):
        a = ok[(ok["model.activation"] == act) & ok["bn.affine"]].set_index("seed")["final/val/acc"]
        b = ok[(ok["model.activation"] == act) & ~ok["bn.affine"]].set_index("seed")["final/val/acc"]
        m, lo, hi, n = C.diff(a - b)
        assert f"{m:+.3f}" in row.measured and n == 2
        assert row.agrees.startswith("yes" if lo > 0 else "no") and "rule:" in row.agrees
    runs, curves = frames(store, "d2l")
    rows = C.claims_d2l(runs, curves)
    v = F.split_runs(runs)[0]["final/val/acc"]
    assert rows[0].agrees.startswith("yes" if v.min() <= 0.878 <= v.max() else "no")


def test_report_sections_open_with_the_claim_table(store, tmp_path):
    out = tmp_path / "results"
    studies = "d2l,ema_vs_precise,precise_samples,norm_batch,gamma_beta"
    assert report.main([f"tracking.uri={store}", f"out={out}", f"study={studies}"]) == 0
    md = (out / "REPORT.md").read_text()
    assert "logit" in md.split("## ")[0]  # the interval method is named in the header
    for study in studies.split(","):
        sec = (out / study / "section.md").read_text().splitlines()
        assert sec[0] == f"## {study}" and sec[2] == "| claim (source) | bnlab measured | agrees? |", study
        for spec in report.figures_for(study):
            assert (out / study / f"{spec.name}.png").stat().st_size > 5000
    # the store inside the project home is shown relative to it: no machine path in REPORT.md
    assert "Store: `sqlite:///runs/mlflow.db (in the project)`" in md
    assert os.environ["BNLAB_HOME"] not in md


def _frame(rows):
    base = {"status": "FINISHED", "diverged": False}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_update_ops_placement_and_momentum_claims_follow_their_rules():
    rows = [{"seed": s, "bn.update_stats": u, "final/train/acc": 0.85, "final/val/acc": 0.84 if u else 0.12,
             "final/val/acc_precise_bn": 0.845, "final/val/acc_batch_stats_bs1": 0.1} for s in range(3) for u in (True, False)]
    got = C.claims_update_ops(_frame(rows), pd.DataFrame())
    assert [c.agrees.split()[0] for c in got] == ["yes", "yes", "yes"]
    rows[1]["final/val/acc"] = 0.7  # one seed without update ops still validates well: the mean 0.31 > 0.3
    assert C.claims_update_ops(_frame(rows), pd.DataFrame())[0].agrees.startswith("no")
    rows = [{"seed": s, "model.activation": "relu", "bn.placement": p, "final/val/acc": v + 0.01 * s}
            for s in range(3) for p, v in (("before_act", 0.85), ("after_act", 0.85), ("none", 0.6))]
    before_none, before_after = C.claims_placement(_frame(rows), pd.DataFrame())
    assert before_none.agrees.startswith("yes") and "+0.250" in before_none.measured
    assert before_after.agrees.startswith("no") and "no measurable difference" in before_after.agrees  # CI [0, 0]
    rows = [{"seed": s, "bn.momentum": 0.1, "data.batch_size": 256, "train.epochs": 1, "data.train_subset": None,
             "final/train/acc": 0.8, "final/val/acc": 0.78, "final/gap/acc": 0.02,
             "final/val/acc_shadow/0.001": 0.2 + 0.01 * s, "final/val/acc_shadow/1": 0.7 + 0.01 * s} for s in range(3)]
    got = C.claims_momentum(_frame(rows), pd.DataFrame())
    assert len(got) == 2 and all(c.agrees.startswith("yes") for c in got)
    assert "234 steps" in got[0].measured and "0.23" in got[0].measured


def test_batch_size_claims_follow_their_rules():
    rows = [{"seed": s, "data.batch_size": b, "bn.placement": p, "final/val/acc": (0.8 if p != "none" else 0.2) + 0.01 * s,
             "final/val/acc_precise_bn": 0.81 + 0.01 * s if p != "none" else None,
             "final/val/acc_batch_stats_bs1": 0.1 if p != "none" else None}
            for s in range(3) for b in (4, 512) for p in ("before_act", "none")]
    got = C.claims_batch_size(_frame(rows), pd.DataFrame())
    assert [c.agrees.split()[0] for c in got] == ["yes", "yes", "yes"]
    rows[0]["final/val/acc_precise_bn"] = 0.70  # one seed at batch 4: precise 0.1 below running -> mean -0.033
    assert C.claims_batch_size(_frame(rows), pd.DataFrame())[1].agrees.startswith("no")


def test_lr_claim_compares_the_regions_of_convergence():
    def rows(none_learns_at_1):
        return _frame([{"seed": s, "optim.lr": lr, "bn.placement": p,
                        "final/train/acc": 0.1 if (p == "none" and lr == 1.0 and not none_learns_at_1) else 0.8}
                       for s in range(2) for lr in (0.1, 1.0) for p in ("before_act", "none")])
    got = C.claims_lr(rows(False), pd.DataFrame())[0]
    assert got.agrees.startswith("yes") and "without [0.1, 0.1]" in got.measured
    assert C.claims_lr(rows(True), pd.DataFrame())[0].agrees.startswith("no")  # same region: not wider

"""Tests of bnlab.analysis: a temporary SQLite store filled through MlflowClient with runs shaped
like every study (several seeds, FAILED / RUNNING / KILLED / diverged runs, a sweep parent run, a
deleted run), read back with runs.py, drawn with figures.py and reported with report.py; one real
training run checks the contract against train(); one test reads the store through `mlflow server`."""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S
from bnlab.analysis.studies import batch_size, momentum, placement, update_ops
from bnlab.analysis.studies import lr as lr_study
from bnlab.analysis import report, runs as R
from bnlab.config import Config, flatten, to_plain

EPOCHS = 4
SHADOWS = [0.0, 0.01, 0.1, 1.0]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------ the synthetic store

def params_for(**over) -> dict:
    """The flattened default config with `over` applied (keys with dots as __), as train() logs it."""
    plain = flatten(to_plain(Config()))
    for k, v in over.items():
        key = k.replace("__", ".")
        assert key in plain, key
        plain[key] = v
    return {k: str(v) for k, v in plain.items()}


def curves_for(rng, *, bn=True, val=0.85, train=0.88, precise=None, batch_stats=None, stats_err=0.05,
               shadows=(), shadow_val=None, diverge_at=None, epochs=EPOCHS) -> dict:
    """Per-epoch metrics as train() logs them (None = not logged at that epoch)."""
    out: dict = {}

    def put(k, e, v):
        out.setdefault(k, [None] * epochs)[e - 1] = v

    for e in range(1, epochs + 1):
        grow = 1 - math.exp(-e / 1.5)
        tr = float(np.clip(train * grow + rng.normal(0, 0.01), 0, 1))
        if diverge_at is not None and e == diverge_at:
            put("train/loss", e, float("nan"))
            put("train/acc", e, 0.1)
            put("perf/train_examples_per_s", e, 20000.0)
            break
        va = float(np.clip(val * grow + rng.normal(0, 0.01), 0, 1))
        put("train/loss", e, 2.3 * (1 - grow) + 0.3)
        put("train/acc", e, tr)
        put("val/loss", e, 2.3 * (1 - grow) + 0.4)
        put("val/acc", e, va)
        put("gap/acc", e, tr - va)
        put("perf/train_examples_per_s", e, float(rng.uniform(15000, 25000)))
        if bn:
            put("val/acc_batch_stats", e, float(np.clip((batch_stats or val) * grow + rng.normal(0, 0.01), 0, 1)))
            put("val/acc_precise_bn", e, float(np.clip((precise or val) * grow + rng.normal(0, 0.01), 0, 1)))
            put("bnstats/mean_err", e, stats_err / e * float(rng.uniform(0.9, 1.1)))
            put("bnstats/var_err", e, 2 * stats_err / e * float(rng.uniform(0.9, 1.1)))
            for m in shadows:
                put(f"val/acc_shadow/{m:g}", e, float(np.clip(shadow_val(m) * grow + rng.normal(0, 0.01), 0, 1)))
                # staler with a smaller momentum; never updated (0) stays at the initial 0/1
                err = 1.0 if m == 0 else stats_err / (e * min(1.0, 100 * m))
                put(f"bnstats/mean_err_shadow/{m:g}", e, err * float(rng.uniform(0.9, 1.1)))
                put(f"bnstats/var_err_shadow/{m:g}", e, 2 * err * float(rng.uniform(0.9, 1.1)))
            if e == epochs:
                put("val/acc_batch_stats_bs1", e, 0.1 + float(rng.normal(0, 0.005)))
    return out


class Store:
    """Builds the store and remembers what was logged, for the assertions."""

    def __init__(self, path: Path):
        from mlflow.tracking import MlflowClient

        self.uri = f"sqlite:///{path / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.art = path / "artifacts"
        self.exps: dict = {}
        self.logged: dict = {}  # run_id -> {"study", "status", "params", "metrics", "diverged"}
        self.rng = np.random.default_rng(0)

    def exp(self, name: str) -> str:
        if name not in self.exps:
            self.exps[name] = self.client.create_experiment(name, artifact_location=(self.art / name).as_uri())
        return self.exps[name]

    def run(self, study: str, metrics: dict, status: str = "FINISHED", role: str = "job", **over) -> str:
        from mlflow.entities import Metric, Param, RunTag

        metrics = {k: v for k, v in metrics.items() if any(x is not None for x in v)}
        params = params_for(tracking__experiment=study, tracking__study=study, **over)
        diverged = any(v is not None and math.isnan(v) for v in metrics.get("train/loss", []))
        tags = {"bnlab.role": role, "bnlab.study": study, "bnlab.seed": params["seed"],
                "bnlab.config_hash": f"h{len(self.logged)}", "bnlab.diverged": str(diverged).lower(),
                "bnlab.git_commit": COMMIT, "bnlab.git_dirty": "false",
                "bnlab.overrides": " ".join(f"{k.replace('__', '.')}={v}" for k, v in over.items())}
        if diverged:
            tags["bnlab.diverged_epoch"] = str(next(i + 1 for i, v in enumerate(metrics["train/loss"])
                                                    if v is not None and math.isnan(v)))
        if status == "FAILED":
            tags["bnlab.error"] = "RuntimeError: out of memory"
        name = ",".join(f"{k.replace('__', '.')}={v}" for k, v in over.items())
        r = self.client.create_run(self.exp(study), run_name=name or "default", tags=tags)
        rid = r.info.run_id
        ms = [Metric(k, float(v), 1000 * step, step) for k, vals in metrics.items()
              for step, v in enumerate(vals, 1) if v is not None]
        self.client.log_batch(rid, metrics=ms, params=[Param(k, v) for k, v in params.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        if status != "RUNNING":
            self.client.set_terminated(rid, status=status)
        self.logged[rid] = {"study": study, "status": status, "params": params, "metrics": metrics,
                            "diverged": diverged}
        return rid

    def parent(self, study: str) -> str:
        r = self.client.create_run(self.exp(study), run_name=f"sweep:{study}",
                                   tags={"bnlab.role": "sweep", "bnlab.study": study})
        self.client.set_terminated(r.info.run_id, "FINISHED")
        return r.info.run_id

    def expected(self, study: str) -> dict:
        return {k: v for k, v in self.logged.items() if v["study"] == study}


def build(path: Path) -> Store:
    s = Store(path)
    rng = s.rng
    # update_ops: 2 x 3 seeds, + one FAILED run and the sweep's parent run (excluded)
    s.parent("update_ops")
    for upd in (True, False):
        for seed in range(3):
            s.run("update_ops", curves_for(rng, val=0.85 if upd else 0.15, train=0.86, precise=0.84,
                                           batch_stats=0.80, stats_err=0.05 if upd else 0.9),
                  seed=seed, bn__update_stats=upd)
    s.run("update_ops", {k: v[:1] for k, v in curves_for(rng).items()}, status="FAILED", seed=3,
          bn__update_stats=False)
    # momentum: shadows over 2 batch sizes x 2 seeds, 2 cumulative runs, one RUNNING, one deleted
    s.parent("momentum")
    for bs in (16, 256):
        for seed in range(2):
            s.run("momentum", curves_for(rng, shadows=SHADOWS, shadow_val=lambda m, bs=bs: 0.15 if m == 0 else
                                         (0.85 if m >= 0.01 else 0.5) - (0.1 if bs == 16 and m == 1.0 else 0)),
                  seed=seed, data__batch_size=bs, bn__shadow_momenta=SHADOWS)
    for seed in range(2):
        s.run("momentum", curves_for(rng, val=0.8), seed=seed, data__batch_size=16, bn__momentum=None)
    s.run("momentum", {k: v[:2] for k, v in curves_for(rng).items()}, status="RUNNING", seed=5)
    gone = s.run("momentum", curves_for(rng), seed=9)
    s.client.delete_run(gone)
    s.logged.pop(gone)
    # batch_size: 3 sizes x with/without BN x 2 seeds; one diverged, one KILLED
    for bs in (8, 64, 512):
        for pl in ("before_act", "none"):
            for seed in range(2):
                div = 2 if (bs == 8 and pl == "none" and seed == 1) else None
                s.run("batch_size", curves_for(rng, bn=pl != "none", val=0.8 if pl != "none" else 0.75,
                                               batch_stats=0.7 if bs == 8 else 0.8, diverge_at=div),
                      seed=seed, data__batch_size=bs, bn__placement=pl)
    s.run("batch_size", {k: v[:1] for k, v in curves_for(rng).items()}, status="KILLED", seed=7)
    # lr: 4 rates x with/without BN x 2 seeds; diverged where the rate is too large; one FAILED
    for lr in (0.01, 0.1, 1.0, 10.0):
        for pl in ("before_act", "none"):
            for seed in range(2):
                div = 1 if ((pl == "none" and (lr == 10.0 or (lr == 1.0 and seed == 1)))
                            or (pl == "before_act" and lr == 10.0 and seed == 0)) else None
                s.run("lr", curves_for(rng, bn=pl != "none", val=0.6 + 0.1 * math.log10(lr * 100) / 2,
                                       diverge_at=div), seed=seed, optim__lr=lr, bn__placement=pl)
    s.run("lr", {k: v[:1] for k, v in curves_for(rng).items()}, status="FAILED", seed=8, optim__lr=0.1)
    # placement: 3 placements x 2 activations x 2 seeds
    for pl in ("before_act", "after_act", "none"):
        for act in ("sigmoid", "relu"):
            for seed in range(2):
                s.run("placement", curves_for(rng, bn=pl != "none", val={"before_act": 0.88, "after_act": 0.86,
                                                                         "none": 0.8}[pl]),
                      seed=seed, bn__placement=pl, model__activation=act)
    for seed in range(2):
        s.run("d2l", curves_for(rng, val=0.87), seed=seed, train__epochs=EPOCHS)
    for upd in (True, False):
        for seed in range(2):
            s.run("smoke", curves_for(rng, val=0.9 if upd else 0.2, epochs=1), seed=seed, bn__update_stats=upd,
                  data__name="synthetic", train__epochs=1)
    for lr in (0.1, 1.0):
        s.run("mystudy", curves_for(rng), seed=0, optim__lr=lr)
    return s


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # A memory-backed folder where there is one: every MLflow write is a SQLite transaction, and
    # its fsync on a disk costs about 3x the time of the whole fixture.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="bnlab-test-", dir=shm))
    else:
        path = tmp_path_factory.mktemp("store")
    try:
        yield build(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def same(a, b) -> bool:
    return (a is None and b is None) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                                         and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=0)


def last_logged(vals):
    return next(v for v in reversed(vals) if v is not None)


def texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


# ------------------------------------------------------------------------------ runs.py

def test_cast_param_follows_the_schema():
    schema = R.param_schema()
    assert schema["bn.momentum"] == R.ParamType("float", True)
    assert R.cast_param(schema["bn.momentum"], "None") is None
    assert R.cast_param(schema["bn.momentum"], "0.01") == 0.01
    assert R.cast_param(schema["bn.update_stats"], "False") is False
    assert R.cast_param(schema["data.batch_size"], "64") == 64
    assert R.cast_param(schema["bn.shadow_momenta"], "[0.0, 0.01]") == [0.0, 0.01]
    assert R.cast_param(schema["model.hidden"], "[256, 128]") == [256, 128]
    assert R.cast_param(schema["bn.placement"], "before_act") == "before_act"
    assert R.cast_param(schema["data.train_subset"], "None") is None
    with pytest.raises(ValueError):
        R.cast_param(schema["data.batch_size"], "sixty")


def test_load_runs_types_counts_and_final_values(store):
    for study in ("update_ops", "momentum", "batch_size", "lr", "placement", "d2l", "smoke", "mystudy"):
        runs = R.load_runs(study, store.uri)
        exp = store.expected(study)
        # parent sweep runs and the deleted run are not rows; every logged run is
        assert sorted(runs["run_id"]) == sorted(exp), study
        assert runs["role"].eq("job").all()
        for _, row in runs.iterrows():
            e = exp[row["run_id"]]
            assert row["status"] == e["status"]
            assert bool(row["diverged"]) == e["diverged"]
            for key, vals in e["metrics"].items():
                assert same(row[f"final/{key}"], last_logged(vals)), (study, key)
    runs = R.load_runs("momentum", store.uri)
    assert runs["bn.momentum"].dtype == np.float64
    assert runs["data.batch_size"].dtype == np.int64
    assert runs["bn.update_stats"].dtype == bool
    assert runs["seed"].dtype == np.int64
    assert str(runs["data.train_subset"].dtype) == "Int64" and runs["data.train_subset"].isna().all()
    cumulative = runs[runs["bn.momentum"].isna()]
    assert len(cumulative) == 2  # logged as "None": the cumulative average, not a missing param
    assert set(runs.loc[runs["bn.momentum"].notna(), "bn.momentum"]) == {0.1}
    shadowed = runs[runs["bn.shadow_momenta"].map(len) > 0]
    assert len(shadowed) == 4 and all(v == SHADOWS for v in shadowed["bn.shadow_momenta"])
    assert {"final/val/acc_shadow/0", "final/val/acc_shadow/0.01", "final/val/acc_shadow/1"} <= set(runs.columns)
    assert runs.loc[runs["status"] == "RUNNING", "end_time"].isna().all()
    assert runs["git_commit"].eq(COMMIT).all() and (~runs["git_dirty"].astype(bool)).all()
    assert runs["tags.bnlab.study"].eq("momentum").all() and runs["study"].eq("momentum").all()
    lr = R.load_runs("lr", store.uri)
    div = lr[lr["diverged"]]
    assert len(div) == 4 and div["diverged_epoch"].eq(1).all() and div["final/train/loss"].isna().all()
    assert lr.loc[lr["status"] == "FAILED", "error"].str.contains("out of memory").all()
    assert R.load_runs("no_such_study", store.uri).empty


def test_load_curves_returns_every_logged_point(store):
    for study in ("update_ops", "momentum", "lr"):
        curves = R.load_curves(study, store.uri)
        exp = store.expected(study)
        n = sum(v is not None for e in exp.values() for vals in e["metrics"].values() for v in vals)
        assert len(curves) == n, study
        got = {(r.run_id, r.metric, r.step): r.value for r in curves.itertuples()}
        for rid, e in exp.items():
            for key, vals in e["metrics"].items():
                for step, v in enumerate(vals, 1):
                    if v is not None:
                        assert same(got[(rid, key, step)], v)
        assert curves["step"].dtype == np.int64 and curves["value"].dtype == np.float64
        # joined to the run's typed params and status
        assert {"bn.momentum", "bn.placement", "status", "diverged", "seed"} <= set(curves.columns)
        assert not any(c.startswith(("final/", "tags.")) for c in curves.columns)
    sub = R.load_curves("update_ops", store.uri, metrics=["val/acc", "train/acc"])
    assert set(sub["metric"]) == {"val/acc", "train/acc"}
    assert sub.groupby("run_id").size().max() == 2 * EPOCHS


def test_sqlite_reading_is_a_fixed_number_of_queries(store, monkeypatch):
    # Bulk, not a loop over runs x metrics: the number of SQL queries does not grow with the runs.
    calls = []
    orig = R._SqliteStore.q
    monkeypatch.setattr(R._SqliteStore, "q", lambda self, sql, params=(): calls.append(sql) or orig(self, sql, params))
    runs = R.load_runs("lr", store.uri)
    R.load_curves("lr", store.uri, runs=runs)
    assert len(runs) > 15 and len(calls) <= 8


def test_real_training_run_matches_the_contract(store):
    from bnlab.config import BNConfig, DataConfig, DataName, TrainConfig
    from bnlab.tracking import MlflowTracker
    from bnlab.train import train

    store.exp("real")  # artifact location inside the temporary folder
    cfg = Config(seed=0, data=DataConfig(name=DataName.synthetic, synthetic_train=256, synthetic_val=128,
                                         batch_size=32),
                 bn=BNConfig(precise_samples=128, shadow_momenta=[0.0, 0.01], momentum=None),
                 train=TrainConfig(epochs=2, bs1_samples=10, progress=False, threads=1))
    final = train(cfg, MlflowTracker(store.uri, "real", "real-run"))
    runs = R.load_runs("real", store.uri)
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["status"] == "FINISHED" and not row["diverged"]
    assert math.isnan(row["bn.momentum"]) and row["bn.shadow_momenta"] == [0.0, 0.01]
    assert row["data.name"] == "synthetic" and row["data.batch_size"] == 32
    assert row["tags.bnlab.threads"] == "1" and "train.threads" not in row  # threads: bookkeeping, a tag
    for k, v in final.items():
        assert row[f"final/{k}"] == pytest.approx(v, rel=1e-6)
    curves = R.load_curves("real", store.uri)
    per = curves.groupby("metric")["step"].apply(sorted).to_dict()
    assert per["val/acc"] == [1, 2] and per["val/acc_shadow/0"] == [1, 2]
    assert per["val/acc_batch_stats_bs1"] == [2]  # last epoch only
    pts = momentum.shadow_rows(runs)
    assert sorted(pts["bn.momentum"].fillna(-1).tolist()) == [-1, 0.0, 0.01]


# ------------------------------------------------------------------------------ statistics

def test_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 29, 100):
        for p in (0.975, 0.995):
            assert S.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    m, ci, n = S.mean_ci([0.1, 0.2, 0.3, float("nan")])
    assert (m, n) == (pytest.approx(0.2), 3) and ci == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-4)
    assert math.isnan(S.mean_ci([0.5])[1]) and S.mean_ci([])[2] == 0
    df = pd.DataFrame({"m": [np.nan, np.nan, 0.1, 0.1], "v": [1.0, 3.0, 2.0, np.inf]})
    agg = S.aggregate(df, ["m"], "v")
    assert len(agg) == 2 and agg.loc[agg["m"].isna(), "mean"].item() == 2.0  # None is a group
    assert agg.loc[agg["m"] == 0.1, "n"].item() == 1  # inf is not averaged


def test_shadow_rows(store):
    runs = R.load_runs("momentum", store.uri)
    ok, _, _ = fr.split_runs(runs)
    pts = momentum.shadow_rows(ok)
    shadowed = ok[ok["bn.shadow_momenta"].map(len) > 0]
    # own row + one per shadow except the shadow equal to the run's own momentum (0.1)
    assert len(pts) == len(ok) + len(shadowed) * (len(SHADOWS) - 1)
    zero = pts[pts["bn.momentum"] == 0.0]
    assert len(zero) == len(shadowed)
    assert np.allclose(zero["final/val/acc"], shadowed["final/val/acc_shadow/0"].to_numpy())
    gap = shadowed["final/train/acc"] - shadowed["final/val/acc_shadow/0"]
    assert np.allclose(zero["final/gap/acc"], gap.to_numpy())


# ------------------------------------------------------------------------------ figures

@pytest.fixture(scope="module")
def frames(store):
    out = {}
    for study in ("update_ops", "momentum", "batch_size", "lr", "placement", "d2l"):
        runs = R.load_runs(study, store.uri)
        out[study] = (runs, R.load_curves(study, store.uri, runs=runs))
    return out


def data_lines(ax):
    """The mean lines (per-seed thin lines, label _seed, left out)."""
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) and not ln.get_label().startswith(("chance", "_seed"))]


def seed_lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_label() == "_seed"]


def test_fig_update_ops(frames):
    runs, curves = frames["update_ops"]
    fig = update_ops.fig_update_ops(curves)
    axes = [a for a in fig.axes if a.get_xlabel() == "epoch"]
    assert len(axes) == 2  # update_stats true and false
    for ax in axes:
        assert len(data_lines(ax)) == 4 and all(len(ln.get_xdata()) == EPOCHS for ln in data_lines(ax))
        # n <= 5 seeds: every seed of every metric is also drawn as a thin line under the mean
        n = int(ax.get_title().split("(n=")[1].split()[0])
        assert len(seed_lines(ax)) == 4 * n and all(ln.get_linewidth() < 1 for ln in seed_lines(ax))
    assert axes[0].get_ylabel() == P.ACC
    assert "bn.update_stats=false" in texts(fig) and "precise BN" in texts(fig)
    assert "left out: 1 FAILED run(s)" in texts(fig)
    # false panel: eval-mode val/acc far below train/acc at the last epoch
    false_ax = next(a for a in axes if "false" in a.get_title())
    y = {ln.get_label(): ln.get_ydata()[-1] for ln in data_lines(false_ax)}
    assert y[update_ops.UPDATE_OPS_METRICS[1][1]] < 0.3 < 0.7 < y[update_ops.UPDATE_OPS_METRICS[0][1]]


def test_fig_momentum_keeps_momentum_zero_and_cumulative(frames):
    runs, _ = frames["momentum"]
    fig = momentum.fig_momentum(runs)
    special = [a for a in fig.axes if a.get_label() == "special-momenta"]
    assert len(special) == 2  # val/acc and gap rows
    points = [[(x, y) for c in ax.containers for x, y in zip(*c.lines[0].get_data())] for ax in special]
    for pts in points:
        assert sum(abs(x - 0) < 0.3 for x, _ in pts) == 2  # momentum 0 (shadow), both batch sizes
        assert sum(abs(x - 1) < 0.3 for x, _ in pts) == 1  # None: the cumulative runs (batch size 16)
    main = [a for a in fig.axes if a.get_xscale() == "log"]
    assert len(main) == 2
    lines = [ln for ln in data_lines(main[0]) if ln.get_label().startswith("batch size")]
    assert len(lines) == 2 and sorted(lines[0].get_xdata()) == [0.01, 0.1, 1.0]
    assert "TF/Keras decay = 1 − momentum" in texts(fig)
    assert "left out: 1 RUNNING run(s)" in texts(fig)
    # value at momentum 0 in the first row is the shadow accuracy (~0.15)
    assert all(abs(y - 0.15) < 0.03 for x, y in points[0] if abs(x) < 0.3)
    fig_plain = momentum.fig_momentum(runs, shadows=False)
    assert "shadow" not in texts(fig_plain)


def test_fig_momentum_heatmap(frames):
    runs, _ = frames["momentum"]
    fig = momentum.fig_momentum_heatmap(runs)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].startswith("0 ") and labels[-1].startswith("None")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "256"]
    cells = [t for t in ax.texts if "n=" in t.get_text() or t.get_text() == "–"]
    assert len(cells) == len(labels) * 2
    assert ax.get_xlabel() and ax.get_ylabel()


def test_fig_batch_size(frames):
    runs, _ = frames["batch_size"]
    fig = batch_size.fig_batch_size(runs)
    ax, ax1 = fig.axes[:2]
    assert ax.get_xscale() == "log" and ax.get_xaxis().get_scale() == "log"
    labels = {ln.get_label() for ln in data_lines(ax)}
    assert {"BN, running statistics (eval mode)", "BN, batch statistics (training mode)", "BN, precise BN",
            "no BN (eval mode)"} <= labels
    xs = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    assert len(xs) == 1 and np.allclose(xs[0].get_xdata(), [8], rtol=0.15)  # the diverged run, nudged aside
    bs1 = data_lines(ax1)
    assert len(bs1) == 1 and np.all(np.abs(bs1[0].get_ydata() - 0.1) < 0.05)  # the collapse
    assert "left out: 1 KILLED run(s)" in texts(fig)


def test_fig_lr_marks_diverged_runs(frames):
    runs, _ = frames["lr"]
    fig = lr_study.fig_lr(runs)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel()
    xs = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    got = sorted(round(x, 3) for ln in xs for x in ln.get_xdata())
    # no BN diverged at lr 1 (1 seed) and 10 (2 seeds), BN at 10 (1 seed): 3 (lr, variant) marks
    assert len(got) == 3 and all(np.allclose(ln.get_ydata(), fr.CHANCE) for ln in xs)
    counts = sorted(t.get_text() for t in ax.texts)
    assert counts == ["1", "1", "2"]
    regions = lr_study.convergence_regions(runs[runs["status"] == "FINISHED"])
    assert regions == {"before_act": [(0.01, 1.0)], "none": [(0.01, 0.1)]}
    band_labels = [ln.get_label() for ln in ax.get_lines() if ln.get_label().startswith("all seeds learn")]
    assert len(band_labels) == 2
    assert "left out: 1 FAILED run(s)" in texts(fig) and "4 diverged run(s)" in texts(fig)


def test_a_run_stuck_at_chance_is_not_in_the_region_of_convergence():
    """Finite loss is not enough: a run whose training accuracy stays at chance did not learn."""
    rows = [(lr, seed, acc, div) for lr, accs in [(0.1, (0.8, 0.8)), (1.0, (0.8, 0.11)), (10.0, (0.7, 0.7)),
                                                   (100.0, (0.1, 0.1))]
            for seed, acc in enumerate(accs) for div in [lr == 100.0 and seed == 0]]
    runs = pd.DataFrame({"optim.lr": [r[0] for r in rows], "seed": [r[1] for r in rows],
                         "final/train/acc": [r[2] for r in rows], "final/val/acc": [r[2] for r in rows],
                         "diverged": [r[3] for r in rows],
                         "status": "FINISHED", "bn.placement": "none"})
    assert lr_study.learned(runs).tolist() == [True, True, True, False, True, True, False, False]
    assert lr_study.convergence_regions(runs) == {"none": [(0.1, 0.1), (10.0, 10.0)]}
    text = lr_study.caption_lr(lr_study.prepare(runs, pd.DataFrame()))
    assert "every seed learns for lr in [0.1, 0.1] and [10, 10]" in text
    assert "diverged: 1 of 2 at lr 100" in text and "stalled (finite loss, no learning): 1 of 2 at lr 1, 1 of 2 at lr 100" in text


def test_fig_placement(frames):
    runs, curves = frames["placement"]
    fig = placement.fig_placement(runs, curves)
    tops = [a for a in fig.axes if a.get_xlabel() == "epoch"]
    bars = [a for a in fig.axes if a.patches]
    assert len(tops) == 2 and len(bars) == 2  # sigmoid and relu
    for ax in tops:
        assert len(data_lines(ax)) == 3
    for ax in bars:
        assert len(ax.patches) == 3
        heights = [p.get_height() for p in ax.patches]
        assert heights[0] > heights[2]  # BN before the activation beats no BN in the synthetic data
    assert {"model.activation=relu", "model.activation=sigmoid"} <= {a.get_title() for a in tops}


def test_fig_running_stats_and_curves(frames):
    _, curves = frames["update_ops"]
    fig = P.fig_running_stats(curves)
    axes = [a for a in fig.axes if a.get_yscale() == "log"]
    assert len(axes) == 2 and all(len(data_lines(a)) == 2 for a in axes)  # update_stats true / false
    assert "bn.update_stats=false" in texts(fig)
    _, curves = frames["d2l"]
    fig = P.fig_curves(curves)
    assert len([a for a in fig.axes if a.get_xlabel() == "epoch"]) == 2
    assert P.fig_running_stats(frames["placement"][1].iloc[:0]).axes  # empty input: a figure, no crash


def test_fig_running_stats_draws_the_momentum_axis_from_shadows(frames):
    """Shadow averages give one line per momentum (at the largest batch size), not per run group."""
    _, curves = frames["momentum"]
    shadow = P.shadow_stat_curves(curves)
    assert set(shadow["bn.momentum"]) == set(SHADOWS)
    # each (run, momentum) is its own series; values are the logged shadow ones
    assert shadow.groupby(["run_id", "metric"]).size().max() == EPOCHS
    fig = P.fig_running_stats(curves)
    axes = [a for a in fig.axes if a.get_yscale() == "log"]
    assert len(axes) == 2 and all(len(data_lines(a)) == len(SHADOWS) for a in axes)
    assert "batch size 256" in texts(fig) and "shadow" in texts(fig)
    # without shadow metrics the figure groups runs as before
    plain = curves[~curves["metric"].str.contains("_shadow/")]
    assert P.shadow_stat_curves(plain).empty


def test_figures_render_without_usable_runs(store, frames):
    runs, curves = frames["lr"]
    failed = runs[runs["status"] == "FAILED"]
    cases = [(failed, curves[curves["run_id"].isin(failed["run_id"])]),
             (R.load_runs("no_such_study", store.uri), R.load_curves("no_such_study", store.uri))]
    for r, c in cases:
        for fig in (update_ops.fig_update_ops(c, runs=r), momentum.fig_momentum(r), momentum.fig_momentum_heatmap(r),
                    batch_size.fig_batch_size(r), lr_study.fig_lr(r), placement.fig_placement(r, c), P.fig_running_stats(c, runs=r),
                    P.fig_curves(c, runs=r)):
            assert fig.get_suptitle() and fig.axes
    assert "left out: 1 FAILED run(s)" in texts(update_ops.fig_update_ops(cases[0][1], runs=failed))


def test_a_study_with_only_its_sweep_parent_has_no_runs(store):
    store.parent("only_parent")
    assert R.load_runs("only_parent", store.uri).empty
    assert R.load_curves("only_parent", store.uri).empty


# ------------------------------------------------------------------------------ report

EXPECTED_FILES = {"update_ops": ["update_ops", "running_stats"], "momentum": ["momentum", "momentum_heatmap",
                  "running_stats"], "batch_size": ["batch_size"], "lr": ["lr"], "placement": ["placement"],
                  "d2l": ["curves"], "smoke": ["curves"]}


@pytest.mark.subprocess
def test_report_writes_every_study(store, tmp_path, capsys):
    out = tmp_path / "results"
    assert report.main([f"tracking.uri={store.uri}", f"out={out}"]) == 0
    md = (out / "REPORT.md").read_text()
    for study, names in EXPECTED_FILES.items():
        for name in names:
            for ext in ("png", "svg"):
                f = out / study / f"{name}.{ext}"
                assert f.is_file() and f.stat().st_size > 5000, f
            assert f"({study}/{name}.png)" in md and f"{study}/{name}.svg" in md
        assert f"`bnlab-train study={study}` then `bnlab-report study={study}`" in md
        summary = pd.read_csv(out / study / "summary.csv")
        assert {"n_runs", "n_seeds", "val/acc:mean", "val/acc:ci95", "val/acc:n"} <= set(summary.columns)
        assert summary["n_runs"].sum() == len(store.expected(study))
    assert "mystudy" not in md  # not a known study: only on request
    assert "Left out: 1 FAILED run." in md and "Left out: 1 RUNNING run." in md and "Left out: 1 KILLED run." in md
    assert "Diverged (finished, loss NaN/inf or above 100): 4 runs" in md
    assert f"`{COMMIT[:12]}` (clean, " in md
    # captions state the numbers computed from the runs
    runs = R.load_runs("update_ops", store.uri)
    off = runs[(runs["status"] == "FINISHED") & ~runs["bn.update_stats"]]
    assert f"With bn.update_stats=false, final val/acc in eval mode is {S.stat(off['final/val/acc'])}" in md
    assert "(n=3)" in md
    summary = pd.read_csv(out / "update_ops" / "summary.csv")
    row = summary[summary["bn.update_stats"] == False].iloc[0]  # noqa: E712
    assert row["n_runs"] == 4 and row["n_seeds"] == 3 and row["left_out"] == "1 FAILED"
    assert row["val/acc:mean"] == pytest.approx(off["final/val/acc"].mean())
    assert "wrote" in capsys.readouterr().out


def test_report_unknown_missing_and_bad_arguments(store, tmp_path, capsys):
    out = tmp_path / "r"
    # neither a study nor an experiment of the store: refused with the list, nothing written
    assert report.main([f"tracking.uri={store.uri}", f"out={out}", "study=mystudy,nothing_here"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nothing_here'" in err and "update_ops" in err and "mystudy" in err
    assert not out.exists()
    assert report.main([f"tracking.uri={store.uri}", f"out={out}", "study=mystudy"]) == 0
    assert (out / "mystudy" / "curves.png").is_file() and (out / "mystudy" / "summary.csv").is_file()
    md = (out / "REPORT.md").read_text()
    assert "mystudy/curves.png" in md and "nothing_here" not in md
    assert report.main([f"tracking.uri=sqlite:///{tmp_path / 'absent.db'}", f"out={out}"]) == 1
    assert not (tmp_path / "absent.db").exists()  # reading never creates a store
    assert report.main(["colour=blue"]) == 2
    assert report.safe_uri("https://me:secret@host:5000/x") == "https://host:5000/x"


# ------------------------------------------------------------------------------ over HTTP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
def test_http_server_gives_the_same_frames_and_report(store, tmp_path):
    port = _free_port()
    db = store.uri[len("sqlite:///"):]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(tmp_path / "art")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            # no GenAI job runner: its 8 worker processes would take the 2 cores for ~30 s
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "mlflow server did not answer /health within 60 s"
            time.sleep(0.5)
        exps = R.list_experiments(url).set_index("name")["n_runs"]
        assert exps["lr"] > 0 and exps["momentum"] > 0 and exps.get("Default", 0) == 0
        for study in ("lr", "momentum"):
            local = R.load_runs(study, store.uri).sort_values("run_id").reset_index(drop=True)
            remote = R.load_runs(study, url).sort_values("run_id").reset_index(drop=True)
            cols = [c for c in local.columns if c not in ("start_time", "end_time")]
            pd.testing.assert_frame_equal(local[cols], remote[cols], check_like=True)
            lc = R.load_curves(study, store.uri).sort_values(["run_id", "metric", "step"]).reset_index(drop=True)
            rc = R.load_curves(study, url).sort_values(["run_id", "metric", "step"]).reset_index(drop=True)
            pd.testing.assert_frame_equal(lc[R.CURVE_COLUMNS], rc[R.CURVE_COLUMNS])
        # the slow path (a server without the bulk endpoint: get_metric_history per run) agrees
        st = R._ClientStore(url)
        st._bulk_ok = False
        ids = sorted(set(lc["run_id"]))[:4]
        slow = st.metrics(st.experiment_id(study), ids, ["val/acc", "train/loss"])
        slow = slow.sort_values(["run_id", "metric", "step"]).reset_index(drop=True)
        want = lc[lc["run_id"].isin(ids) & lc["metric"].isin(["val/acc", "train/loss"])].reset_index(drop=True)
        assert len(slow) == len(want) > 0
        np.testing.assert_array_equal(slow["value"].to_numpy(), want["value"].to_numpy())
        out = tmp_path / "results"
        assert report.main([f"tracking.uri={url}", f"out={out}", "study=lr,update_ops"]) == 0
        assert (out / "lr" / "lr.png").is_file() and (out / "update_ops" / "update_ops.svg").is_file()
        assert "Left out: 1 FAILED run." in (out / "REPORT.md").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

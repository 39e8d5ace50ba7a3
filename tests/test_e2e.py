"""End-to-end single runs: a `bnlab-train` job in this process (the composed config through
bnlab.cli's task) into a temporary store, and the run's status on failure, interruption and
divergence; bnlab-ui (a subprocess) serving that store from another directory."""
from __future__ import annotations

import pytest

from bnlab.config import Activation, Config, DataConfig, DataName, ModelConfig, ModelName, OptimConfig, Placement, TrainConfig
from bnlab.tracking import MlflowTracker
from bnlab import train as train_mod

from conftest import UI, run_job, runs_of, store_uri

EPOCH_METRICS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_batch_stats",
                 "val/acc_precise_bn", "gap/acc", "perf/train_examples_per_s",
                 "bnstats/mean_err", "bnstats/var_err", "train/lr"}


def test_single_run_logs_everything(home, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the store goes to the project home, wherever the command runs
    run_job("data=synthetic", "train.epochs=2", "train.threads=1", "bn.momentum=0.3", "bn.shadow_momenta=[0.01,0.5]")
    out = capsys.readouterr().out
    assert "train/acc" in out and "val/acc" in out and "logged to experiment 'bnlab'" in out
    c, runs = runs_of(home, "bnlab")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # a single run is named by the defining keys it overrides (train.threads is bookkeeping)
    assert run.info.run_name == "data=synthetic ep=2 mom=0.3 shadows=[0.01,0.5]"
    expected = EPOCH_METRICS | {f"{k}_shadow/{m}" for k in ("val/acc", "bnstats/mean_err", "bnstats/var_err")
                                for m in ("0.01", "0.5")} | {"val/acc_batch_stats_bs1"}
    assert set(run.data.metrics) == expected
    for key in expected - {"val/acc_batch_stats_bs1"}:
        hist = c.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [1, 2], key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/acc_batch_stats_bs1")] == [2]
    m = run.data.metrics
    assert m["gap/acc"] == pytest.approx(m["train/acc"] - m["val/acc"])
    assert m["val/acc_batch_stats"] > 0.5, "the synthetic set is learnable in two epochs"
    p = run.data.params
    assert p["bn.momentum"] == "0.3" and p["data.name"] == "synthetic" and p["seed"] == "0"
    t = run.data.tags
    assert len(t["bnlab.config_hash"]) == 16 and t["bnlab.git_dirty"] in ("true", "false")
    assert t["bnlab.git_commit"] and "bn.momentum=0.3" in t["bnlab.overrides"]
    text = c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "momentum: 0.3" in open(text).read()
    # the store sits in the project home, not in the working directory
    assert (home / "runs" / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("store_home")
def test_real_fashion_mnist_missing_update_ops_and_precise_bn(home):
    """The seed's pitfall and its fix, on the real data: one epoch with update ops missing."""
    run_job("train.epochs=1", "bn.update_stats=false", "train.threads=1")  # threads: not set by test order
    _, runs = runs_of(home, "bnlab")
    m = runs[0].data.metrics
    assert m["val/acc"] <= 0.30, m
    assert m["val/acc_batch_stats"] >= 0.70 and m["val/acc_precise_bn"] >= 0.70, m
    assert m["train/acc"] >= 0.60, m


def small_cfg(**kw) -> Config:
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=256, synthetic_val=64, batch_size=32),
                 train=TrainConfig(epochs=2, threads=1, bs1_samples=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    return cfg


def tracker_for(home, name="t"):
    return MlflowTracker(store_uri(home), "unit", name)


@pytest.mark.usefixtures("store_home")
def test_failure_is_recorded_as_failed(home, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(train_mod, "epoch_metrics", boom)
    with pytest.raises(RuntimeError):
        train_mod.train(small_cfg(), tracker_for(home))
    _, runs = runs_of(home, "unit")
    assert runs[0].info.status == "FAILED"
    assert "evaluation exploded" in runs[0].data.tags["bnlab.error"]


@pytest.mark.usefixtures("store_home")
def test_ctrl_c_marks_the_run_killed(home, monkeypatch):
    calls = {"n": 0}
    real = train_mod.epoch_metrics

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "epoch_metrics", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(small_cfg(), tracker_for(home))
    c, runs = runs_of(home, "unit")
    assert runs[0].info.status == "KILLED"
    assert [m.step for m in c.get_metric_history(runs[0].info.run_id, "val/acc")] == [1]


@pytest.mark.usefixtures("store_home")
def test_divergence_stops_tags_and_finishes(home):
    cfg = small_cfg(model=ModelConfig(name=ModelName.mlp, hidden=[64], activation=Activation.relu),
                    optim=OptimConfig(lr=1e30))
    cfg.bn.placement = Placement.none
    cfg.train.epochs = 3
    out = train_mod.train(cfg, tracker_for(home))
    assert out["diverged_epoch"] == 1
    c, runs = runs_of(home, "unit")
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["bnlab.diverged"] == "true" and run.data.tags["bnlab.diverged_epoch"] == "1"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert "val/acc" not in run.data.metrics


def test_same_seed_same_result():
    a = train_mod.train(small_cfg())
    b = train_mod.train(small_cfg())
    keys = [k for k in a if not k.startswith("perf/")]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_no_bn_logs_only_what_exists():
    cfg = small_cfg()
    cfg.bn.placement = Placement.none
    out = train_mod.train(cfg)
    assert "val/acc" in out and "val/acc_batch_stats" not in out and "val/acc_precise_bn" not in out


@pytest.mark.subprocess
def test_ui_serves_the_project_store_from_any_directory(home, tmp_path):
    """bnlab-ui started elsewhere shows the runs that bnlab-train wrote (loopback only)."""
    train_mod.train(small_cfg(), tracker_for(home, "seen-in-ui"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ui = UI(home, cwd=elsewhere)
    try:
        ui.wait_for(r"^export MLFLOW_TRACKING_URI=")  # printed once the server answers
        exp = ui.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="unit")["experiment"]
        runs = ui.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["seen-in-ui"]
        assert b"<html" in ui.get("/").lower()  # the UI page itself
        assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "mlruns").exists()
    finally:
        ui.kill()

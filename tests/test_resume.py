"""Runs that resume: a run killed after a complete epoch continues, in the same MLflow run, from
its checkpoint, and ends bit for bit where an uninterrupted run ends (CPU, same thread count)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from bnlab import checkpoint as ck
from bnlab import sweep
from bnlab import train as train_mod
from bnlab.config import Config, DataConfig, DataName, TrainConfig
from bnlab.roles import config_hash
from bnlab.store import TAG
from bnlab.tracking import MlflowTracker

from conftest import cli, runs_of, store_uri

TIMING = "perf/"  # wall-clock figures: the only metrics allowed to differ


def cfg_for(**train_kw) -> Config:
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=256, synthetic_val=64, batch_size=32),
                 train=TrainConfig(epochs=3, threads=1, bs1_samples=8, **train_kw))
    cfg.bn.shadow_momenta = [0.01, 0.5]
    cfg.bn.freeze_at = 2  # FrozenBN from epoch 2: a run resumed after it must be frozen too
    cfg.optim.schedule = type(cfg.optim.schedule)("cosine")
    cfg.__post_init__()
    return cfg


class Stop(KeyboardInterrupt):
    """The interruption, raised from the fault point after a named epoch (ends the run KILLED)."""


def kill_after(monkeypatch, n: int) -> None:
    def point(epoch: int, *args, **kwargs) -> None:
        if epoch == n:
            raise Stop
    monkeypatch.setattr(train_mod, "after_epoch", point)


def history(c, run_id):
    run = c.get_run(run_id)
    return {k: [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in run.data.metrics if not k.startswith(TIMING)}


def artifacts(c, run_id, path=""):
    out = []
    for f in c.list_artifacts(run_id, path):
        out += artifacts(c, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def model_state(c, run_id, tmp_path):
    p = c.download_artifacts(run_id, "model.pt", str(tmp_path))
    return torch.load(p, weights_only=False)["state_dict"]


@pytest.mark.parametrize("eval_every,kill_at", [(0, 2), (3, 1)])
@pytest.mark.usefixtures("store_home")
def test_killed_run_resumes_bit_identical(home, tmp_path, monkeypatch, eval_every, kill_at):
    cfg = cfg_for(eval_every=eval_every)
    uri = store_uri(home)
    ref = MlflowTracker(uri, "resume", "ref")
    final_ref = train_mod.train(cfg, ref)

    kill_after(monkeypatch, kill_at)
    first = MlflowTracker(uri, "resume", "cut")
    with pytest.raises(Stop):
        train_mod.train(cfg, first)
    c, _ = runs_of(home, "resume")
    cut = c.get_run(first.run_id)
    assert cut.info.status == "KILLED" and ck.last_epoch(cut.data.tags) == kill_at
    # one checkpoint kept, the previous epoch's removed
    assert artifacts(c, first.run_id, ck.CHECKPOINT_DIR) == [f"{ck.CHECKPOINT_DIR}/{ck.name(kill_at)}"]

    monkeypatch.setattr(train_mod, "after_epoch", lambda epoch, **kwargs: None)
    again = MlflowTracker(uri, "resume", "cut")
    again.take_over(first.run_id, {})
    final = train_mod.train(cfg, again)

    assert {k: v for k, v in final.items() if not k.startswith(TIMING)} == \
        {k: v for k, v in final_ref.items() if not k.startswith(TIMING)}  # exact equality
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and TAG + "resumed" in run.data.tags
    # why it stopped is kept, but not as an error of a run that finished
    assert TAG + "error" not in run.data.tags and run.data.tags[TAG + "interrupted"] == "interrupted (Ctrl-C)"
    assert history(c, first.run_id) == history(c, ref.run_id)  # every step once, the same values
    steps = [s for s, _ in history(c, first.run_id)["val/acc"]]
    assert steps == [1, 2, 3]
    # checkpoints are gone once the run finished; the final model is kept, equal to the reference's
    assert artifacts(c, first.run_id) == ["config.yaml", "model.pt"]
    assert ck.EPOCH_TAG not in run.data.tags
    a, b = model_state(c, first.run_id, tmp_path / "a"), model_state(c, ref.run_id, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("store_home")
def test_kill_before_the_first_epoch_ends_leaves_nothing_to_resume(home, monkeypatch):
    def boom(*a, **k):
        raise Stop
    monkeypatch.setattr(train_mod, "epoch_metrics", boom)
    t = MlflowTracker(store_uri(home), "resume", "early")
    with pytest.raises(Stop):
        train_mod.train(cfg_for(), t)
    cfg = cfg_for()
    # no complete epoch: a relaunch starts a new run, the KILLED one stays as it is
    assert sweep.interrupted_run(store_uri(home), "resume", config_hash(cfg)) is None


def test_capture_restore_roundtrip_restores_every_rng():
    import random

    cfg = cfg_for()
    s = train_mod.setup(cfg)
    train_mod.train_epoch(s, cfg.data.batch_size)
    state = ck.from_bytes(ck.to_bytes(ck.capture(s, 1, {"val/acc": 0.5})))
    want = (torch.rand(3), random.random(), torch.rand(2, generator=s.gen), torch.rand(2, generator=s.eval_gen))
    s2 = train_mod.setup(cfg)
    assert ck.restore(s2, state) == (1, {"val/acc": 0.5})
    got = (torch.rand(3), random.random(), torch.rand(2, generator=s2.gen), torch.rand(2, generator=s2.eval_gen))
    assert torch.equal(want[0], got[0]) and want[1] == got[1]
    assert torch.equal(want[2], got[2]) and torch.equal(want[3], got[3])
    assert s2.global_step == s.global_step


FAST = ["train.threads=1", "train.epochs=3", "data.synthetic_train=256", "hydra.job.chdir=false"]


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_sigkilled_sweep_resumes_the_same_run(home, run_cli):
    """A real SIGKILL at a named step (after epoch 1 of the first job), then a relaunch: the
    killed grid point continues in its own run; every grid point FINISHED once."""
    args = ["study=smoke", "seed=0", *FAST]
    r = cli("bnlab-train", *args, home=home, env={"BNLAB_FAULT": "kill_after_epoch:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    c, runs = runs_of(home, "smoke")
    jobs = [x for x in runs if x.data.tags.get(TAG + "role") == "job"]
    assert len(jobs) == 1 and jobs[0].info.status == "RUNNING"
    killed = jobs[0].info.run_id
    r = run_cli("bnlab-train", *args, home=home)  # the relaunch: what a run does, in this process
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 finished, 0 failed, 0 skipped" in r.stdout
    c, runs = runs_of(home, "smoke")
    jobs = [x for x in runs if x.data.tags.get(TAG + "role") == "job"]
    assert sorted(x.info.status for x in jobs) == ["FINISHED", "FINISHED"]
    run = c.get_run(killed)
    assert TAG + "resumed" in run.data.tags
    assert [m.step for m in c.get_metric_history(killed, "train/loss")] == [1, 2, 3]

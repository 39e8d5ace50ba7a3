"""Sweeps with real Hydra launchers in subprocesses on temporary stores: parent/child grouping,
parallel jobs without store races, resume after SIGKILL, divergence,
Ctrl-C and the submitit local executor. SIGKILL and Ctrl-C come at a named step (bnlab.faults)."""
from __future__ import annotations

import pytest

import os
import re
import signal
from collections import Counter

from conftest import cli, runs_of

FAST = ["train.threads=1"]


def children(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def parents(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]


@pytest.mark.usefixtures("store_home")
def test_smoke_sequential_groups_runs_and_resume_skips_finished(home, run_cli):
    r = run_cli("bnlab-train", "study=smoke", *FAST, home=home, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 job(s) validated" in r.stdout
    _, runs = runs_of(home, "smoke")
    kids, (parent,) = children(runs), parents(runs)
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    assert parent.info.status == "FINISHED" and re.fullmatch(r"smoke \d\d-\d\d \d\d:\d\d", parent.info.run_name)
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    assert sorted(k.data.tags["bnlab.job"] for k in kids) == ["0", "1", "2", "3"]
    assert {k.data.tags["bnlab.study"] for k in kids} == {"smoke"}
    assert {k.data.tags["bnlab.seed"] for k in kids} == {"0", "1"}
    assert {k.info.run_name for k in kids} == {f"update={u} s={s}" for u in ("on", "off") for s in (0, 1)}
    # relaunch: every grid point already has a FINISHED run, so nothing is trained again
    r2 = run_cli("bnlab-train", "study=smoke", *FAST, home=home, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("skipped: config") + r2.stdout.count("skipped: config") == 4
    _, runs2 = runs_of(home, "smoke")
    assert len(children(runs2)) == 4 and len(parents(runs2)) == 1


def _finished_per_hash(runs):
    return Counter(r.data.tags["bnlab.config_hash"] for r in children(runs) if r.info.status == "FINISHED")


@pytest.mark.subprocess
def test_joblib_eight_jobs_four_at_a_time_on_a_fresh_store(home):
    r = cli("bnlab-train", "study=smoke", "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
            home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "duplicate column" not in r.stderr and "Traceback" not in r.stderr
    _, runs = runs_of(home, "smoke")
    kids = children(runs)
    assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids)
    assert len(_finished_per_hash(runs)) == 8
    # joblib workers share the 2 cores: each job got cores / n_jobs torch threads
    assert {k.data.tags["bnlab.threads"] for k in kids} == {str(max(1, (os.cpu_count() or 1) // 4))}


# Two epochs, so that a run stopped after epoch 1 is caught in the middle of its training.
TWO_EPOCHS = ["study=smoke", "train.epochs=2", *FAST]


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_sigkill_then_relaunch_gives_one_finished_run_per_grid_point(home, run_cli):
    # Job 0 finishes; job 1 is SIGKILLed once its first epoch is in the store (bnlab.faults).
    r = cli("bnlab-train", *TWO_EPOCHS, home=home, env={"BNLAB_FAULT": "kill_after_epoch:1@1"})
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    _, runs = runs_of(home, "smoke")
    by_job = {k.data.tags["bnlab.job"]: k for k in children(runs)}
    assert sorted(by_job) == ["0", "1"]
    assert by_job["0"].info.status == "FINISHED"
    assert by_job["1"].info.status == "RUNNING" and "train/loss" in by_job["1"].data.metrics
    assert parents(runs)[0].info.status == "RUNNING"  # its process is gone too
    # the relaunch: what a run does, in this process
    r = run_cli("bnlab-train", *TWO_EPOCHS, home=home, env={"BNLAB_FAULT": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bnlab-train: 3 finished, 0 failed, 1 skipped, 0 diverged" in r.stdout, r.stdout[-2000:]
    c, runs = runs_of(home, "smoke")
    per_hash = _finished_per_hash(runs)
    assert len(per_hash) == 4 and set(per_hash.values()) == {1}, per_hash
    # The killed run had epoch 1 checkpointed: the relaunch took it over and resumed it into the
    # same MLflow run (no fifth run), its curve continuing at epoch 2 with no step logged twice.
    assert Counter(k.info.status for k in children(runs)) == {"FINISHED": 4}
    resumed = c.get_run(by_job["1"].info.run_id)
    assert resumed.info.status == "FINISHED" and "bnlab.resumed" in resumed.data.tags
    steps = [m.step for m in c.get_metric_history(resumed.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2], steps
    assert all(p.info.status == "FINISHED" for p in parents(runs)) and len(parents(runs)) == 1


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_ctrl_c_marks_the_current_run_and_the_sweep_killed(home):
    # Ctrl-C (SIGINT to the process) while job 1 trains: after its first epoch of two.
    r = cli("bnlab-train", *TWO_EPOCHS, home=home, env={"BNLAB_FAULT": "sigint_after_epoch:1@1"})
    assert r.returncode != 0
    _, runs = runs_of(home, "smoke")
    by_job = {k.data.tags["bnlab.job"]: k for k in children(runs)}
    assert sorted(by_job) == ["0", "1"], sorted(by_job)  # jobs 2 and 3 never started
    assert by_job["0"].info.status == "FINISHED"
    stopped = by_job["1"]
    assert stopped.info.status == "KILLED" and stopped.data.tags["bnlab.error"] == "interrupted (Ctrl-C)"
    assert "train/loss" in stopped.data.metrics
    (parent,) = parents(runs)
    assert parent.info.status == "KILLED"


@pytest.mark.usefixtures("store_home")
def test_a_diverged_run_does_not_stop_the_sweep(home, run_cli):
    r = run_cli("bnlab-train", "-m", "data=synthetic", "model=mlp", "bn.placement=none", "optim.lr=1e30,0.1,1e36",
            "train.epochs=2", "tracking.experiment=div", *FAST, home=home, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = runs_of(home, "div")
    kids = children(runs)
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    by_lr = {k.data.params["optim.lr"]: k for k in kids}
    assert by_lr["1e+30"].data.tags["bnlab.diverged"] == "true"
    assert by_lr["1e+36"].data.tags["bnlab.diverged"] == "true"
    assert by_lr["0.1"].data.tags["bnlab.diverged"] == "false" and "val/acc" in by_lr["0.1"].data.metrics


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_submitit_local_executor(home, run_cli):
    # the sweep submits and waits in this process; each job is a submitit process of its own
    r = run_cli("bnlab-train", "study=smoke", "seed=3", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                *FAST, home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = runs_of(home, "smoke")
    kids = children(runs)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert {k.data.tags["bnlab.seed"] for k in kids} == {"3"}


def test_slurm_preset_composes():
    from hydra import compose, initialize_config_dir
    from bnlab import cli as bcli

    bcli._prepare_env()
    with initialize_config_dir(str(bcli.conf_dir()), version_base="1.3"):
        c = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "SlurmLauncher" in c.hydra.launcher._target_ and c.hydra.launcher.gpus_per_node == 1

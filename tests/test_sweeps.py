"""Sweeps with real Hydra launchers in subprocesses on temporary stores: parent/child grouping,
parallel jobs without store races, an HTTP tracking server, resume after SIGKILL, divergence,
Ctrl-C and the submitit local executor."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter

from conftest import BIN, cli, free_port, mlflow_server, runs_of

FAST = ["train.threads=1"]


def children(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def parents(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]


def test_smoke_sequential_groups_runs_and_resume_skips_finished(home):
    r = cli("bnlab-train", "study=smoke", *FAST, home=home, timeout=600)
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
    r2 = cli("bnlab-train", "study=smoke", *FAST, home=home, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("skipped: config") + r2.stdout.count("skipped: config") == 4
    _, runs2 = runs_of(home, "smoke")
    assert len(children(runs2)) == 4 and len(parents(runs2)) == 1


def _finished_per_hash(runs):
    return Counter(r.data.tags["bnlab.config_hash"] for r in children(runs) if r.info.status == "FINISHED")


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


def test_joblib_through_a_real_mlflow_server(home, tmp_path):
    port = free_port()
    server = mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        r = cli("bnlab-train", "study=smoke", "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                f"tracking.uri={uri}", home=home, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        _, runs = runs_of(home, "smoke", uri=uri)
        kids = children(runs)
        assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids)
        assert len(parents(runs)) == 1 and parents(runs)[0].info.status == "FINISHED"
        assert not (home / "runs" / "mlflow.db").exists(), "runs went to the server, not the local store"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _wait_for(home, experiment, pred, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before the condition was met"
        if (home / "runs" / "mlflow.db").exists():
            try:
                _, runs = runs_of(home, experiment)
                if pred(children(runs)):
                    return
            except Exception:  # experiment not created yet, or the store mid-migration
                pass
        time.sleep(0.5)
    raise AssertionError("condition not reached")


SLOW_SMOKE = ["study=smoke", "train.epochs=30", "data.synthetic_train=1024", *FAST]


def _launch(home, args):
    env = {**os.environ, "BNLAB_HOME": str(home)}
    return subprocess.Popen([str(BIN / "bnlab-train"), *args], cwd=str(home), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_sigkill_then_relaunch_gives_one_finished_run_per_grid_point(home):
    proc = _launch(home, SLOW_SMOKE)
    try:
        _wait_for(home, "smoke", lambda ks: any(k.info.status == "FINISHED" for k in ks)
                  and any(k.info.status == "RUNNING" for k in ks), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    r = cli("bnlab-train", *SLOW_SMOKE[:1], "train.epochs=30", "data.synthetic_train=1024", *FAST,
            home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = runs_of(home, "smoke")
    kids = children(runs)
    per_hash = _finished_per_hash(runs)
    assert len(per_hash) == 4 and set(per_hash.values()) == {1}, per_hash
    statuses = Counter(k.info.status for k in kids)
    # the killed run either stays KILLED (killed in its first epoch) or was resumed (issue 19)
    resumed = sum("bnlab.resumed" in k.data.tags for k in kids)
    assert statuses["RUNNING"] == 0 and statuses["KILLED"] + resumed >= 1, statuses
    assert all(p.info.status == "FINISHED" for p in parents(runs)) and len(parents(runs)) == 1


def test_ctrl_c_marks_the_current_run_and_the_sweep_killed(home):
    # Long enough (minutes) that the interrupt always lands while a run trains, however fast the machine.
    proc = _launch(home, [*SLOW_SMOKE, "train.epochs=1000"])
    try:
        # A run in training (it has logged an epoch), not one that has only claimed its grid point.
        _wait_for(home, "smoke", lambda ks: any(k.info.status == "RUNNING" and "train/loss" in k.data.metrics
                                                for k in ks), proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    _, runs = runs_of(home, "smoke")
    statuses = Counter(k.info.status for k in children(runs))
    assert statuses["KILLED"] == 1 and statuses["RUNNING"] == 0, statuses
    assert parents(runs)[0].info.status == "KILLED"


def test_a_diverged_run_does_not_stop_the_sweep(home):
    r = cli("bnlab-train", "-m", "data=synthetic", "model=mlp", "bn.placement=none", "optim.lr=1e30,0.1,1e36",
            "train.epochs=2", "tracking.experiment=div", *FAST, home=home, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = runs_of(home, "div")
    kids = children(runs)
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    by_lr = {k.data.params["optim.lr"]: k for k in kids}
    assert by_lr["1e+30"].data.tags["bnlab.diverged"] == "true"
    assert by_lr["1e+36"].data.tags["bnlab.diverged"] == "true"
    assert by_lr["0.1"].data.tags["bnlab.diverged"] == "false" and "val/acc" in by_lr["0.1"].data.metrics


def test_submitit_local_executor(home):
    r = cli("bnlab-train", "study=smoke", "seed=3", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            *FAST, home=home, timeout=900)
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

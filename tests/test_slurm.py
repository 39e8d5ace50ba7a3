"""A real study through hydra/launcher=slurm on a one-node SLURM cluster without accounting:
every grid point FINISHED once and in the report; tasks SIGKILLed after epoch 1 (a named fault
point) count as failed within a bounded time, their runs end KILLED, and the relaunch resumes
each in its own run with no duplicate."""
from __future__ import annotations

import time
from collections import Counter

import pytest

from cluster import slurm
from conftest import cli, runs_of

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    with slurm() as c:
        print(f"\none-node SLURM cluster up in {c['start_s']:.1f} s")
        yield c


def launcher_args(c) -> list:
    # one CPU and 1 GB a task (the node has no GPU); train.threads=1 to match
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={c['partition']}", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
            "train.threads=1"]


def jobs_of(home):
    c, runs = runs_of(home, "smoke")
    return c, [r for r in runs if r.data.tags.get("bnlab.role") == "job"], \
        [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]


def test_a_study_through_slurm(cluster, home, tmp_path):
    t0 = time.time()
    r = cli("bnlab-train", "study=smoke", *launcher_args(cluster), home=home, env=cluster["env"], timeout=600)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"\nsmoke study (4 array tasks) through SLURM: {wall:.1f} s")
    assert "4 finished, 0 failed, 0 skipped, 0 diverged" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert sorted(j.info.status for j in jobs) == ["FINISHED"] * 4
    assert len({j.data.tags["bnlab.config_hash"] for j in jobs}) == 4
    assert all(j.data.tags.get("bnlab.slurm_task") for j in jobs)  # each ran as an array task
    assert [p.info.status for p in parents] == ["FINISHED"]
    out = tmp_path / "report"
    r = cli("bnlab-report", "study=smoke", f"out={out}", home=home, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (out / "REPORT.md").read_text()
    assert "smoke" in md and list(out.rglob("*.png"))


def test_killed_tasks_fail_in_bounded_time_and_resume(cluster, home):
    args = ["study=smoke", "train.epochs=2", *launcher_args(cluster)]
    env = {**cluster["env"], "BNLAB_FAULT": "kill_after_epoch:1", "BNLAB_SLURM_GRACE_S": "5"}
    t0 = time.time()
    r = cli("bnlab-train", *args, home=home, env=env, timeout=600)
    wall = time.time() - t0
    print(f"\n4 tasks SIGKILLed after epoch 1: sweep exited {r.returncode} after {wall:.1f} s")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 finished, 4 failed" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert sorted(j.info.status for j in jobs) == ["KILLED"] * 4  # ended by the sweep, not left RUNNING
    assert parents[0].data.tags["bnlab.jobs_failed"] == "4" and parents[0].info.status == "FAILED"
    killed = {j.data.tags["bnlab.config_hash"]: j.info.run_id for j in jobs}
    # the relaunch resumes every run after its epoch 1
    r = cli("bnlab-train", *args, home=home, env=cluster["env"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 finished, 0 failed, 0 skipped" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert Counter(j.info.status for j in jobs) == {"FINISHED": 4}  # no new run, no duplicate
    assert {j.data.tags["bnlab.config_hash"]: j.info.run_id for j in jobs} == killed
    for j in jobs:
        assert "bnlab.resumed" in j.data.tags
        assert [m.step for m in c.get_metric_history(j.info.run_id, "train/loss")] == [1, 2]

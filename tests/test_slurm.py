"""A real study through hydra/launcher=slurm on a one-node SLURM cluster without accounting:
every grid point FINISHED once and in the report; tasks SIGKILLed after epoch 1 (a named fault
point) count as failed within a bounded time, their runs end KILLED, and the relaunch resumes
each in its own run with no duplicate."""
from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime

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


@pytest.mark.usefixtures("store_home")
def test_a_study_through_slurm(cluster, home, tmp_path, run_cli):
    # The sweep that submits and waits runs in this process (the tasks are SLURM's processes); one
    # seed of the smoke study: 2 array tasks.
    t0 = time.time()
    r = run_cli("bnlab-train", "study=smoke", "seed=0", *launcher_args(cluster), home=home, env=cluster["env"])
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"\nsmoke study, one seed (2 array tasks) through SLURM: {wall:.1f} s")
    assert "2 finished, 0 failed, 0 skipped, 0 diverged" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert sorted(j.info.status for j in jobs) == ["FINISHED"] * 2
    assert len({j.data.tags["bnlab.config_hash"] for j in jobs}) == 2
    assert all(j.data.tags.get("bnlab.slurm_task") for j in jobs)  # each ran as an array task
    assert [p.info.status for p in parents] == ["FINISHED"]
    out = tmp_path / "report"
    r = run_cli("bnlab-report", "study=smoke", f"out={out}", home=home)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (out / "REPORT.md").read_text()
    assert "smoke" in md and list(out.rglob("*.png"))


@pytest.mark.usefixtures("store_home")
def test_killed_tasks_fail_in_bounded_time_and_resume(cluster, home, run_cli):
    args = ["study=smoke", "seed=0", "train.epochs=2", *launcher_args(cluster)]  # 2 array tasks
    env = {**cluster["env"], "BNLAB_FAULT": "kill_after_epoch:1", "BNLAB_SLURM_GRACE_S": "5"}
    t0 = time.time()
    r = run_cli("bnlab-train", *args, home=home, env=env)  # the fault is the tasks': SLURM passes them the environment
    wall = time.time() - t0
    print(f"\n2 tasks SIGKILLed after epoch 1: sweep exited {r.returncode} after {wall:.1f} s")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 finished, 2 failed" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert sorted(j.info.status for j in jobs) == ["KILLED"] * 2  # ended by the sweep, not left RUNNING
    assert parents[0].data.tags["bnlab.jobs_failed"] == "2" and parents[0].info.status == "FAILED"
    killed = {j.data.tags["bnlab.config_hash"]: j.info.run_id for j in jobs}
    # the relaunch (in this process: it submits and waits; its tasks are SLURM's) resumes every run
    # after its epoch 1
    r = run_cli("bnlab-train", *args, home=home, env=cluster["env"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 finished, 0 failed, 0 skipped" in r.stdout
    c, jobs, parents = jobs_of(home)
    assert Counter(j.info.status for j in jobs) == {"FINISHED": 2}  # no new run, no duplicate
    assert {j.data.tags["bnlab.config_hash"]: j.info.run_id for j in jobs} == killed
    for j in jobs:
        assert "bnlab.resumed" in j.data.tags
        assert [m.step for m in c.get_metric_history(j.info.run_id, "train/loss")] == [1, 2]


def _diagnostics(home, c) -> str:
    """What a failed requeue test needs: submitit's task logs and slurmctld's log (its tail)."""
    out = []
    for f in sorted((home / "runs" / "hydra" / "multirun").rglob(".submitit/*/*_log.*")):
        out.append(f"--- {f.name}\n{f.read_text()[-2500:]}")
    log = c["dir"] / "slurmctld.log"
    if log.exists():
        out.append(f"--- slurmctld.log\n{log.read_text()[-4000:]}")
    return "\n".join(out)


@pytest.mark.usefixtures("store_home")
def test_a_preempted_task_is_requeued_and_resumes_its_run(cluster, home, tmp_path, run_cli):
    """SIGUSR2 (SLURM's warning before preemption or a time limit) after epoch 1 of job 0: submitit
    checkpoints and requeues the task, whose next attempt continues the same run from its epoch-1
    checkpoint and ends where an uninterrupted run of that config ends."""
    args = ["study=smoke", "seed=0", "train.epochs=3", *launcher_args(cluster)]
    env = {**cluster["env"], "BNLAB_FAULT": "usr2_after_epoch:1@0"}
    t0 = time.time()
    r = run_cli("bnlab-train", *args, home=home, env=env)  # submits and waits here; the tasks are SLURM's
    wall = time.time() - t0
    print(f"\n2 array tasks, task 0 preempted (SIGUSR2) after epoch 1: sweep exited {r.returncode} "
          f"after {wall:.1f} s")
    why = r.stdout[-3000:] + r.stderr[-3000:] + _diagnostics(home, cluster)
    assert r.returncode == 0, why
    assert "2 finished, 0 failed, 0 skipped, 0 diverged" in r.stdout, why
    c, jobs, parents = jobs_of(home)
    # every grid point FINISHED exactly once: no second run for the requeued task's config
    assert sorted(j.info.status for j in jobs) == ["FINISHED"] * 2, why
    assert len({j.data.tags["bnlab.config_hash"] for j in jobs}) == 2
    assert [p.info.status for p in parents] == ["FINISHED"]
    preempted = next(j for j in jobs if j.data.tags["bnlab.job"] == "0")
    other = next(j for j in jobs if j.data.tags["bnlab.job"] == "1")
    # job 0 went on in its own run after epoch 1 (the same SLURM task id across the requeue)
    assert "bnlab.resumed" in preempted.data.tags and "bnlab.resumed" not in other.data.tags, why
    assert sorted(m.step for m in c.get_metric_history(preempted.info.run_id, "val/acc")) == [1, 2, 3]
    attempts = [f for f in (home / "runs" / "hydra" / "multirun").rglob(".submitit/*/*_log.out")
                if f.name.startswith(preempted.data.tags["bnlab.slurm_task"] + "_")]
    log = "".join(f.read_text() for f in attempts)
    # submitit's handler requeued it (once), nothing else did; its second attempt ran to the end
    stamps = re.findall(r"^submitit INFO \((.{23})\) - (Requeued job|Starting with)", log, re.M)
    assert [what for _, what in stamps] == ["Starting with", "Requeued job", "Starting with"], why
    assert "bnlab.error" not in preempted.data.tags
    assert preempted.data.tags["bnlab.interrupted"].startswith("stopped by the scheduler")
    at = {what: datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t, what in stamps}  # the last of each
    print(f"requeued task 0 started again {(at['Starting with'] - at['Requeued job']).total_seconds():.1f} s "
          f"after submitit requeued it")

    # The same grid, uninterrupted, on this machine at the same thread count: bit-identical.
    ref_home = tmp_path / "ref"
    ref_home.mkdir()
    r = cli("bnlab-train", "study=smoke", "seed=0", "train.epochs=3", "train.threads=1", home=ref_home, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rc, ref_jobs, _ = jobs_of(ref_home)
    ref = {j.data.tags["bnlab.config_hash"]: j for j in ref_jobs}
    for j in (preempted, other):
        want = ref[j.data.tags["bnlab.config_hash"]]
        assert {k: v for k, v in j.data.metrics.items() if not k.startswith("perf/")} == \
            {k: v for k, v in want.data.metrics.items() if not k.startswith("perf/")}
        assert sorted((m.step, m.value) for m in c.get_metric_history(j.info.run_id, "val/acc")) == \
            sorted((m.step, m.value) for m in rc.get_metric_history(want.info.run_id, "val/acc"))

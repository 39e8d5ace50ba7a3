"""Each grid point (config hash) is trained exactly once, whatever number of bnlab-train processes
share a store: two sweeps launched together on a fresh store, and on an existing store sharing one
sweep folder; a live claim of another host, a stale claim taken over; and the report counts each
config hash once in stores that hold duplicates. Through an HTTP server: tests/test_http_store.py."""
from __future__ import annotations

import pytest

import time
from collections import Counter

from conftest import runs_of, store_uri
from sweeps_at_once import assert_once, kids, start, summed_summaries, sweeps, two_at_once, wait_all

FAST = ["train.threads=1"]


@pytest.mark.subprocess
def test_two_sweeps_at_once_on_a_fresh_store(home):
    codes, outs = two_at_once(home, ["study=smoke", *FAST])
    assert codes == [0, 0], outs
    text = "".join(outs)
    assert "duplicate column" not in text and "already exists" not in text and "Traceback" not in text
    runs = assert_once(home, outs, 4)
    # each process kept its own parent run, with its own counts
    parents = sweeps(runs)
    assert len(parents) == 2
    assert sorted(int(p.data.tags["bnlab.jobs_finished"]) for p in parents) in ([0, 4], [1, 3], [2, 2])


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_two_sweeps_at_once_on_an_existing_store_sharing_one_sweep_dir(home, tmp_path, run_cli):
    # The store exists (one earlier sweep). Both sweeps share an explicit hydra.sweep.dir, and one
    # of them runs its jobs on two joblib workers: three claimants at once. Each grid point is
    # trained once, and each sweep keeps its own parent run and its own counts.
    r = run_cli("bnlab-train", "-m", "data=synthetic", "train.epochs=1", "tracking.experiment=smoke", *FAST, home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    _, before = runs_of(home, "smoke")
    grid = ["study=smoke", "seed=0,1,2", f"hydra.sweep.dir={tmp_path / 'shared'}", *FAST]
    codes, outs = wait_all([start(home, [*grid, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]),
                            start(home, grid)])
    assert codes == [0, 0], outs
    _, runs = runs_of(home, "smoke")
    # the earlier single-config sweep plus 6 grid points, each FINISHED once
    fin = Counter(k.data.tags["bnlab.config_hash"] for k in kids(runs) if k.info.status == "FINISHED")
    assert len(fin) == 7 and set(fin.values()) == {1}, fin
    assert not [k for k in kids(runs) if k.info.status != "FINISHED"], [k.info.status for k in kids(runs)]
    assert summed_summaries(outs) == (6, 6)
    assert sum(o.count("skipped: config") for o in outs) == 6
    by_id = {p.info.run_id: p for p in sweeps(runs)}
    new = by_id.keys() - {p.info.run_id for p in sweeps(before)}
    assert len(new) == 2
    for pid in new:
        mine = [k for k in kids(runs) if k.data.tags["mlflow.parentRunId"] == pid]
        assert by_id[pid].info.status == "FINISHED"
        assert int(by_id[pid].data.tags["bnlab.jobs_finished"]) == len(mine)
    assert sum(int(by_id[pid].data.tags["bnlab.jobs_finished"]) for pid in new) == 6


def _fake_claim(home, h: str, heartbeat: float) -> str:
    """A RUNNING run of config `h` owned by a process on another host (its pid cannot be checked)."""
    from bnlab.store import ensure_experiment
    from mlflow.tracking import MlflowClient

    exp_id = ensure_experiment(store_uri(home), "smoke")
    c = MlflowClient(store_uri(home))
    run = c.create_run(exp_id, run_name="elsewhere", tags={
        "bnlab.config_hash": h, "bnlab.role": "job", "bnlab.host": "another-host", "bnlab.pid": "1",
        "bnlab.heartbeat": f"{heartbeat:.0f}"})
    return run.info.run_id


def _hash_of(*overrides: str) -> str:
    from bnlab import cli as bcli
    from bnlab.roles import config_hash

    bcli._prepare_env()
    jobs, _ = bcli.expand_jobs(list(overrides))
    (job,) = jobs
    return config_hash(bcli.validate_job(job))


@pytest.mark.usefixtures("store_home")
def test_a_live_claim_is_skipped_and_a_stale_one_taken_over(home, run_cli):
    args = ["study=smoke", "seed=0", "bn.update_stats=true", *FAST]
    h = _hash_of(*args)
    live = _fake_claim(home, h, time.time())
    r = run_cli("bnlab-train", *args, home=home, env={"BNLAB_CLAIM_TIMEOUT_S": "86400"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"is being trained by run {live} (host another-host, pid 1)" in r.stdout + r.stderr
    assert "0 finished, 0 failed, 1 skipped, 0 diverged" in r.stdout
    # the same claim, its last heartbeat now two days old (timeout one day): taken over and marked KILLED
    c, _ = runs_of(home, "smoke")
    stale = time.time() - 2 * 86400
    c.set_tag(live, "bnlab.heartbeat", f"{stale:.0f}")
    r = run_cli("bnlab-train", *args, home=home, env={"BNLAB_CLAIM_TIMEOUT_S": "86400"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 finished, 0 failed, 0 skipped, 0 diverged" in r.stdout
    c, runs = runs_of(home, "smoke")
    old = c.get_run(live)
    assert old.info.status == "KILLED" and "no heartbeat" in old.data.tags["bnlab.error"]
    fin = [k for k in kids(runs) if k.info.status == "FINISHED"]
    assert [k.data.tags["bnlab.config_hash"] for k in fin] == [h]
    assert float(fin[0].data.tags["bnlab.heartbeat"]) > stale + 86400  # its own, fresh heartbeat


@pytest.mark.usefixtures("store_home")
def test_the_report_counts_each_config_hash_once(home, tmp_path, run_cli):
    # tracking.resume=false trains every grid point again: the store now holds duplicates, as
    # stores written by two concurrent sweeps before claims existed do
    for _ in range(2):
        r = run_cli("bnlab-train", "study=smoke", "tracking.resume=false", *FAST, home=home)
        assert r.returncode == 0, r.stderr[-2000:]
    from bnlab.analysis.runs import load_runs

    runs = load_runs("smoke", store_uri(home))
    assert len(runs) == 4 and runs["config_hash"].is_unique and runs.attrs["duplicates"] == 4
    r = run_cli("bnlab-report", "study=smoke", f"out={tmp_path / 'rep'}", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    section = (tmp_path / "rep" / "smoke" / "section.md").read_text()
    assert "4 runs, 4 used in the means" in section
    assert "Each (config group, seed) counted once (the first FINISHED run): 4 more runs" in section
    assert "n=4" not in section

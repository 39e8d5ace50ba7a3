"""Each grid point (config hash) is trained exactly once, whatever number of bnlab-train processes
share a store: two sweeps launched together on a fresh and on an existing store, over one HTTP
server, a live claim of another host, a stale claim taken over; and the report counts each config
hash once in stores that hold duplicates."""
from __future__ import annotations

import pytest

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from conftest import BIN, cli, free_port, mlflow_server, runs_of, store_uri

FAST = ["train.threads=1"]


def _kids(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def _start(home: Path, args, fault: str = "", fault_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1", "BNLAB_FAULT": fault}
    if fault_dir is not None:
        env["BNLAB_FAULT_DIR"] = str(fault_dir)
    return subprocess.Popen([str(BIN / "bnlab-train"), *args], cwd=str(home), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_all(procs, timeout: float = 600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def _two_at_once(home: Path, args, timeout: float = 600):
    # Launched together, in whatever order the machine runs them: exactly once must hold for every
    # interleaving. The HTTP claim race is also forced both ways below (bnlab.faults claim_race).
    return _wait_all([_start(home, args) for _ in range(2)], timeout)


def _assert_once(home, outs, n_points, uri=None, experiment="smoke"):
    _, runs = runs_of(home, experiment, uri=uri)
    kids = _kids(runs)
    fin = Counter(k.data.tags["bnlab.config_hash"] for k in kids if k.info.status == "FINISHED")
    assert len(fin) == n_points and set(fin.values()) == {1}, fin
    assert not [k for k in kids if k.info.status != "FINISHED"], [k.info.status for k in kids]
    # every grid point was trained by one process and skipped (and said so) by the other
    summaries = [ln for o in outs for ln in o.splitlines() if ln.startswith("bnlab-train: ") and " finished, " in ln]
    assert len(summaries) == 2, outs
    finished = sum(int(s.split("bnlab-train: ")[1].split()[0]) for s in summaries)
    skipped = sum(int(s.split(" skipped")[0].split()[-1]) for s in summaries)
    assert finished == n_points and skipped == n_points, summaries
    assert sum(o.count("skipped: config") for o in outs) == n_points
    parents = [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]
    assert all(p.info.status == "FINISHED" for p in parents)
    return runs


@pytest.mark.subprocess
def test_two_sweeps_at_once_on_a_fresh_store(home):
    codes, outs = _two_at_once(home, ["study=smoke", *FAST])
    assert codes == [0, 0], outs
    text = "".join(outs)
    assert "duplicate column" not in text and "already exists" not in text and "Traceback" not in text
    runs = _assert_once(home, outs, 4)
    # each process kept its own parent run, with its own counts
    parents = [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]
    assert len(parents) == 2
    assert sorted(int(p.data.tags["bnlab.jobs_finished"]) for p in parents) in ([0, 4], [1, 3], [2, 2])


@pytest.mark.subprocess
def test_two_sweeps_at_once_on_an_existing_store(home, run_cli):
    r = run_cli("bnlab-train", "-m", "data=synthetic", "train.epochs=1", "tracking.experiment=smoke", *FAST, home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    codes, outs = _two_at_once(home, ["study=smoke", "seed=0,1,2", "hydra/launcher=joblib",
                                      "hydra.launcher.n_jobs=2", *FAST])
    assert codes == [0, 0], outs
    _, runs = runs_of(home, "smoke")
    # the earlier single-config sweep plus 6 grid points
    fin = Counter(k.data.tags["bnlab.config_hash"] for k in _kids(runs) if k.info.status == "FINISHED")
    assert len(fin) == 7 and set(fin.values()) == {1}, fin


@pytest.mark.subprocess
def test_two_sweeps_at_once_through_one_server(home, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port, workers=2)
    try:
        codes, outs = _two_at_once(home, ["study=smoke", f"tracking.uri={uri}", *FAST])
        assert codes == [0, 0], outs
        _assert_once(home, outs, 4, uri=uri)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


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
    fin = [k for k in _kids(runs) if k.info.status == "FINISHED"]
    assert [k.data.tags["bnlab.config_hash"] for k in fin] == [h]
    assert float(fin[0].data.tags["bnlab.heartbeat"]) > stale + 86400  # its own, fresh heartbeat


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


@pytest.mark.subprocess
def test_two_sweeps_sharing_one_sweep_dir(home, tmp_path):
    # an explicit hydra.sweep.dir shared by both: each keeps its own parent run and its own counts
    codes, outs = _two_at_once(home, ["study=smoke", f"hydra.sweep.dir={tmp_path / 'shared'}", *FAST])
    assert codes == [0, 0], outs
    runs = _assert_once(home, outs, 4)
    parents = {p.info.run_id: p for p in runs if p.data.tags.get("bnlab.role") == "sweep"}
    assert len(parents) == 2
    for k in _kids(runs):
        assert k.data.tags["mlflow.parentRunId"] in parents
    for pid, p in parents.items():
        mine = [k for k in _kids(runs) if k.data.tags["mlflow.parentRunId"] == pid]
        assert int(p.data.tags["bnlab.jobs_finished"]) == len(mine)


# ----------------------------------------------------------------- the HTTP claim race, forced

TWO_POINTS = ["study=smoke", "seed=0", "train.epochs=2", *FAST]  # jobs 0 and 1: update_stats true, false
# Racer ranks (bnlab.faults claim_race): in job 0 process A makes its conditional write first, in
# job 1 process B does; both have done every check before either writes.
A_FIRST_THEN_B = ("claim_race:1@0,claim_race:2@1", "claim_race:2@0,claim_race:1@1")


def _server(tmp_path):
    port = free_port()
    return f"http://127.0.0.1:{port}", mlflow_server(tmp_path, port, workers=2)


def _stop(server) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def _race(home, tmp_path, uri, extra=()):
    signals = tmp_path / "signals"
    signals.mkdir(exist_ok=True)
    procs = [_start(home, [*TWO_POINTS, *extra, f"tracking.uri={uri}"], fault, signals) for fault in A_FIRST_THEN_B]
    codes, outs = _wait_all(procs)
    assert codes == [0, 0], outs
    for o in outs:  # each process trained one grid point and skipped the other
        assert "bnlab-train: 1 finished, 0 failed, 1 skipped, 0 diverged" in o, o[-3000:]
        assert o.count("skipped: config") == 1 and "took slot bnlab.claim/" in o, o[-3000:]
    return [p.pid for p in procs]


def _winners(home, uri):
    """{job number: the FINISHED run} and every job run."""
    _, runs = runs_of(home, "smoke", uri=uri)
    kids = _kids(runs)
    fin = [k for k in kids if k.info.status == "FINISHED"]
    assert Counter(k.data.tags["bnlab.config_hash"] for k in fin) == Counter(
        {h: 1 for h in {k.data.tags["bnlab.config_hash"] for k in kids}}), [k.info.status for k in kids]
    return {k.data.tags["bnlab.job"]: k for k in fin}, kids


def _slots_hidden(uri):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    assert not [e.name for e in c.search_experiments() if e.name.startswith("bnlab.claim/")]
    return sorted(e.name.rsplit("/", 1)[1] for e in c.search_experiments(view_type=ViewType.ALL)
                  if e.name.startswith("bnlab.claim/"))


@pytest.mark.subprocess
def test_http_claim_race_forced_both_ways(home, tmp_path):
    uri, server = _server(tmp_path)
    try:
        pid_a, pid_b = _race(home, tmp_path, uri)
        winners, kids = _winners(home, uri)
        assert len(kids) == 2, [k.info.status for k in kids]  # a job that lost created no run at all
        assert winners["0"].data.tags["bnlab.pid"] == str(pid_a)  # A wrote first in job 0
        assert winners["1"].data.tags["bnlab.pid"] == str(pid_b)  # B wrote first in job 1
        assert {w.data.tags["bnlab.claim_slot"].rsplit("/", 1)[1] for w in winners.values()} == {"0"}
        assert _slots_hidden(uri) == ["0", "0"]
    finally:
        _stop(server)


@pytest.mark.subprocess
def test_http_dead_claims_are_taken_over_exactly_once_both_ways(home, tmp_path):
    uri, server = _server(tmp_path)
    try:
        # Two claimants that die after epoch 1 of 2 (SIGKILL), one per grid point: slot 0 of each
        # is held by a dead process.
        dead = [_start(home, [*TWO_POINTS, f"bn.update_stats={u}", f"tracking.uri={uri}"], "kill_after_epoch:1")
                for u in ("true", "false")]
        codes, outs = _wait_all(dead)
        assert codes == [-signal.SIGKILL] * 2, outs
        _, runs = runs_of(home, "smoke", uri=uri)
        assert [k.info.status for k in _kids(runs)] == ["RUNNING"] * 2
        pid_a, pid_b = _race(home, tmp_path, uri)
        winners, kids = _winners(home, uri)
        # Each dead claimant's run had epoch 1 checkpointed: the slot's winner resumed it in place.
        assert Counter(k.info.status for k in kids) == {"FINISHED": 2}
        assert all("bnlab.resumed" in k.data.tags for k in kids)
        assert winners["0"].data.tags["bnlab.pid"] == str(pid_a)
        assert winners["1"].data.tags["bnlab.pid"] == str(pid_b)
        assert {w.data.tags["bnlab.claim_slot"].rsplit("/", 1)[1] for w in winners.values()} == {"1"}
        assert _slots_hidden(uri) == ["0", "0", "1", "1"]
    finally:
        _stop(server)

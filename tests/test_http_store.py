"""bnlab-train through one real `mlflow server` (two workers, a temporary SQLite store), shared by
the tests of this module: two sweeps at once, two joblib workers of one sweep, the claim race forced
both ways, and dead claims taken over exactly once. Each test writes its own experiment; a claim's
slot experiments are named after the experiment's id (bnlab.sweep), so tests never share a slot."""
from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from conftest import cli, free_port, mlflow_server, runs_of
from sweeps_at_once import assert_once, kids, start, sweeps, two_at_once, wait_all

pytestmark = pytest.mark.subprocess

FAST = ["train.threads=1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of a loopback `mlflow server --workers 2`, stopped after the module's last test."""
    port = free_port()
    proc = mlflow_server(tmp_path_factory.mktemp("server"), port, workers=2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def experiment(request) -> str:
    """This test's own experiment on the shared server."""
    return request.node.name.replace("test_", "", 1)


def test_two_sweeps_at_once_through_one_server(home, server, experiment):
    codes, outs = two_at_once(home, ["study=smoke", f"tracking.uri={server}", f"tracking.experiment={experiment}",
                                     *FAST])
    assert codes == [0, 0], outs
    assert_once(home, outs, 4, uri=server, experiment=experiment)


def test_joblib_through_a_real_mlflow_server(home, server, experiment):
    # two joblib workers logging at once through the server (four at a time: test_sweeps.py)
    r = cli("bnlab-train", "study=smoke", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"tracking.uri={server}", f"tracking.experiment={experiment}", home=home, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _, runs = runs_of(home, experiment, uri=server)
    ks = kids(runs)
    assert len(ks) == 4 and all(k.info.status == "FINISHED" for k in ks)
    assert len({k.data.tags["bnlab.config_hash"] for k in ks}) == 4
    assert len(sweeps(runs)) == 1 and sweeps(runs)[0].info.status == "FINISHED"
    assert not (home / "runs" / "mlflow.db").exists(), "runs went to the server, not the local store"


# ----------------------------------------------------------------- the HTTP claim race, forced

TWO_POINTS = ["study=smoke", "seed=0", "train.epochs=2", *FAST]  # jobs 0 and 1: update_stats true, false
# Racer ranks (bnlab.faults claim_race): in job 0 process A makes its conditional write first, in
# job 1 process B does; both have done every check before either writes.
A_FIRST_THEN_B = ("claim_race:1@0,claim_race:2@1", "claim_race:2@0,claim_race:1@1")


def _race(home, tmp_path, args):
    signals = tmp_path / "signals"
    signals.mkdir(exist_ok=True)
    procs = [start(home, [*TWO_POINTS, *args], fault, signals) for fault in A_FIRST_THEN_B]
    codes, outs = wait_all(procs)
    assert codes == [0, 0], outs
    for o in outs:  # each process trained one grid point and skipped the other
        assert "bnlab-train: 1 finished, 0 failed, 1 skipped, 0 diverged" in o, o[-3000:]
        assert o.count("skipped: config") == 1 and "took slot bnlab.claim/" in o, o[-3000:]
    return [p.pid for p in procs]


def _winners(home, uri, experiment):
    """{job number: the FINISHED run} and every job run."""
    _, runs = runs_of(home, experiment, uri=uri)
    ks = kids(runs)
    fin = [k for k in ks if k.info.status == "FINISHED"]
    assert Counter(k.data.tags["bnlab.config_hash"] for k in fin) == Counter(
        {h: 1 for h in {k.data.tags["bnlab.config_hash"] for k in ks}}), [k.info.status for k in ks]
    return {k.data.tags["bnlab.job"]: k for k in fin}, ks


def _slots_hidden(uri, experiment):
    """The generations of the experiment's claim slots, each deleted (hidden) once settled."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    prefix = f"bnlab.claim/{c.get_experiment_by_name(experiment).experiment_id}/"
    assert not [e.name for e in c.search_experiments() if e.name.startswith(prefix)]
    return sorted(e.name.rsplit("/", 1)[1] for e in c.search_experiments(view_type=ViewType.ALL)
                  if e.name.startswith(prefix))


def test_http_claim_race_forced_both_ways(home, tmp_path, server, experiment):
    pid_a, pid_b = _race(home, tmp_path, [f"tracking.uri={server}", f"tracking.experiment={experiment}"])
    winners, ks = _winners(home, server, experiment)
    assert len(ks) == 2, [k.info.status for k in ks]  # a job that lost created no run at all
    assert winners["0"].data.tags["bnlab.pid"] == str(pid_a)  # A wrote first in job 0
    assert winners["1"].data.tags["bnlab.pid"] == str(pid_b)  # B wrote first in job 1
    assert {w.data.tags["bnlab.claim_slot"].rsplit("/", 1)[1] for w in winners.values()} == {"0"}
    assert _slots_hidden(server, experiment) == ["0", "0"]


def test_http_dead_claims_are_taken_over_exactly_once_both_ways(home, tmp_path, server, experiment):
    where = [f"tracking.uri={server}", f"tracking.experiment={experiment}"]
    # Two claimants that die after epoch 1 of 2 (SIGKILL), one per grid point: slot 0 of each is
    # held by a dead process.
    dead = [start(home, [*TWO_POINTS, f"bn.update_stats={u}", *where], "kill_after_epoch:1") for u in ("true", "false")]
    codes, outs = wait_all(dead)
    assert codes == [-signal.SIGKILL] * 2, outs
    _, runs = runs_of(home, experiment, uri=server)
    assert [k.info.status for k in kids(runs)] == ["RUNNING"] * 2
    pid_a, pid_b = _race(home, tmp_path, where)
    winners, ks = _winners(home, server, experiment)
    # Each dead claimant's run had epoch 1 checkpointed: the slot's winner resumed it in place.
    assert Counter(k.info.status for k in ks) == {"FINISHED": 2}
    assert all("bnlab.resumed" in k.data.tags for k in ks)
    assert winners["0"].data.tags["bnlab.pid"] == str(pid_a)
    assert winners["1"].data.tags["bnlab.pid"] == str(pid_b)
    assert {w.data.tags["bnlab.claim_slot"].rsplit("/", 1)[1] for w in winners.values()} == {"1"}
    assert _slots_hidden(server, experiment) == ["0", "0", "1", "1"]

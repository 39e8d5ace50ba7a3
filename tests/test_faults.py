"""The test-only fault hook (bnlab.faults): parsing, loud failures, and the race protocol's order.
The faults' effects on real sweeps are tested where they are used (test_store_failures, test_sweeps,
test_exactly_once, test_http_store)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bnlab import faults


def test_unset_does_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("epoch_logged", epoch=1, job=0)
    faults.point("claim_create")
    assert faults.active() == ()


def test_parsing_several_with_job_selectors(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_after_epoch:2@1, fail_claim_create ,claim_race:2@0,usr2_after_epoch:1@0")
    assert faults.active() == (faults.Fault("kill_after_epoch", 2, 1), faults.Fault("fail_claim_create", None, None),
                               faults.Fault("claim_race", 2, 0), faults.Fault("usr2_after_epoch", 1, 0))


@pytest.mark.parametrize("text, words", [
    ("no_such_fault", ["unknown fault 'no_such_fault'", "kill_after_epoch", "claim_race"]),
    ("kill_after_epoch", ["needs a number"]),
    ("fail_claim_create:1", ["takes no ':N'"]),
    ("claim_race:3", ["rank must be 1 or 2"]),
    ("sigint_after_epoch:one", ["must be an integer"]),
])
def test_bad_faults_fail_loudly(monkeypatch, text, words):
    monkeypatch.setenv(faults.ENV, text)
    with pytest.raises(faults.FaultError) as e:
        faults.point("epoch_logged", epoch=1)
    for w in words:
        assert w in str(e.value)


def test_bnlab_train_refuses_an_unknown_fault_in_one_line(home):
    from conftest import cli

    r = cli("bnlab-train", "data=synthetic", home=home, env={faults.ENV: "kill_after_epok:1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "BNLAB_FAULT: unknown fault 'kill_after_epok'" in lines[0], r.stderr
    assert not (home / "runs").exists()


def test_a_fault_for_another_job_or_epoch_does_nothing(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_after_epoch:2@1,fail_claim_create@3")
    faults.point("epoch_logged", epoch=2, job=0)  # another job
    faults.point("epoch_logged", epoch=1, job=1)  # another epoch
    faults.point("claim_create", job="2")
    with pytest.raises(Exception, match="planted fault"):
        faults.point("claim_create", job="3")  # job numbers arrive as tag strings too


def test_an_unanswered_wait_fails_loudly(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV, "claim_race:1")
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(faults.TIMEOUT_ENV, "0.2")
    with pytest.raises(faults.FaultError, match="racer 2's checks"):
        faults.point("claim_race", key="h")
    monkeypatch.delenv(faults.DIR_ENV)
    with pytest.raises(faults.FaultError, match=faults.DIR_ENV):
        faults.point("claim_race", key="h")


def test_the_disk_is_filled_only_on_a_small_file_system(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV, "store_full_after_job:0")
    free = __import__("shutil").disk_usage(tmp_path).free
    if free <= faults.FULL_LIMIT_BYTES:
        pytest.skip("this disk is small enough to be filled")
    with pytest.raises(faults.FaultError, match="fills only file systems"):
        faults.point("job_done", job=0, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / faults.FILLER).exists()


def test_usr2_after_epoch_runs_the_handler_in_place_after_the_flush(monkeypatch):
    import signal

    class Preempted(Exception):
        pass

    def handler(signum, frame):  # as submitit's: it raises (SystemExit) from the signal point
        raise Preempted(signum)

    monkeypatch.setenv(faults.ENV, "usr2_after_epoch:2@0")
    flushed = []
    old = signal.signal(signal.SIGUSR2, handler)
    try:
        faults.point("epoch_logged", epoch=1, job=0, flush=lambda: flushed.append(1))  # another epoch
        faults.point("epoch_logged", epoch=2, job=1, flush=lambda: flushed.append(1))  # another job
        assert flushed == []
        with pytest.raises(Preempted):
            faults.point("epoch_logged", epoch=2, job=0, flush=lambda: flushed.append(2))
        assert flushed == [2]
    finally:
        signal.signal(signal.SIGUSR2, old)


RACER = """
import os, sys
from bnlab import faults
log = sys.argv[1]
def say(what):
    with open(log, "a") as f:
        f.write(f"{os.environ['RANK']} {what}\\n")
faults.point("claim_race", key="h")
say("writes")
faults.point("claim_settled", key="h")
"""


def test_racer_2_writes_only_after_racer_1_whichever_starts_first(tmp_path):
    # Racer 2 starts first and reaches the point first; it must still write second.
    log = tmp_path / "log"
    procs = []
    for rank in (2, 1):
        env = {"PATH": "/usr/bin:/bin", faults.ENV: f"claim_race:{rank}", faults.DIR_ENV: str(tmp_path),
               "RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", RACER, str(log)], env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["1 writes", "2 writes"]

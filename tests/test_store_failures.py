"""A store that fails in the middle of a sweep (read-only, full, a server that dies, a claim that
cannot be created): the sweep stops after the first failure with one clear line, counts what was not
run, exits non-zero, and a relaunch trains the rest exactly once. Each fault is planted at a named
step (bnlab.faults): after job 0 of the smoke study's four, so the counts are exact. Real file
systems: a small tmpfs (needs root to mount)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from bnlab import faults
from conftest import BIN, cli, free_port, mlflow_server, runs_of

FAST = ["train.threads=1"]
SWEEP = ["study=smoke", *FAST]  # four jobs: #0 finishes, #1 meets the broken store, #2 and #3 do not run
STOPPED = "1 finished, 1 failed, 0 skipped, 0 diverged; stopped after the first store failure, 2 job(s) not run"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]}): needs root")


def _umount(path: Path) -> None:
    subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _env(home: Path, fault: str = "", fault_dir: Path | None = None) -> dict:
    env = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    if fault_dir is not None:
        env[faults.DIR_ENV] = str(fault_dir)
    return env


def _train(run_cli, home: Path, args, fault: str = "", process: bool = False) -> subprocess.CompletedProcess:
    """bnlab-train in this process (run_cli), or with process=True in its own: a sweep that the
    broken store leaves with a RUNNING run must be a process that then ends, as a user's does (a
    relaunch ends the runs of a dead process, not its own)."""
    return (cli if process else run_cli)("bnlab-train", *args, home=home, env={faults.ENV: fault})


def _check_stopped(rc: int, out: str) -> str:
    assert rc == 1, out[-3000:]
    summary = [ln for ln in out.splitlines() if ln.startswith("bnlab-train: ") and " finished, " in ln]
    assert len(summary) == 1, out[-3000:]
    line = summary[0]
    assert STOPPED in line, line
    # one job met the failure, the two after it did not start: no traceback per job
    assert out.count("Traceback") == 0, out[-3000:]
    assert out.count("not run: the store failed earlier") == 2, out[-3000:]
    return line


def _jobs(home: Path, uri: str):
    _, runs = runs_of(home, "smoke", uri=uri)
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def _relaunch_trains_the_rest(run_cli, home: Path, uri: str | None) -> None:
    r = _train(run_cli, home, [*SWEEP, *([f"tracking.uri={uri}"] if uri else [])])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "bnlab-train: 3 finished, 0 failed, 1 skipped, 0 diverged" in r.stdout, r.stdout[-2000:]
    fin = Counter(k.data.tags["bnlab.config_hash"] for k in _jobs(home, uri) if k.info.status == "FINISHED")
    assert len(fin) == 4 and set(fin.values()) == {1}, fin
    assert not [k for k in _jobs(home, uri) if k.info.status == "RUNNING"]


@pytest.mark.subprocess
def test_store_turns_read_only_after_the_first_job(home, tmp_path, run_cli):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "64m")
    try:
        uri = f"sqlite:///{mnt / 'store' / 'mlflow.db'}"
        r = _train(run_cli, home, [*SWEEP, f"tracking.uri={uri}"], "store_readonly_after_job:0", process=True)
        out = r.stdout + r.stderr
        line = _check_stopped(r.returncode, out)
        assert "OperationalError: unable to open database file" in line, line  # SQLite: no journal
        assert "not written: the run's claim" in line, line
        assert "could not record the sweep's counts" in out
        subprocess.run(["chattr", "-i", str(mnt / "store" / "mlflow.db"), str(mnt / "store")], check=True)
        # job 0's run is the only one: job 1's claim was refused, jobs 2 and 3 never started
        assert [k.info.status for k in _jobs(home, uri)] == ["FINISHED"]
        _relaunch_trains_the_rest(run_cli, home, uri)
    finally:
        _umount(mnt)


@pytest.mark.subprocess
def test_disk_full_after_the_first_job(home, tmp_path, run_cli):
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "16m")
    try:
        uri = f"sqlite:///{mnt / 'mlflow.db'}"
        r = _train(run_cli, home, [*SWEEP, f"tracking.uri={uri}"], "store_full_after_job:0", process=True)
        line = _check_stopped(r.returncode, r.stdout + r.stderr)
        assert "database or disk is full" in line, line
        assert (mnt / faults.FILLER).stat().st_size > 0
        (mnt / faults.FILLER).unlink()
        assert [k.info.status for k in _jobs(home, uri)] == ["FINISHED"]
        # the parent the full disk left RUNNING belongs to a dead process: a relaunch ends it,
        # reuses it and trains the rest, each grid point exactly once
        _relaunch_trains_the_rest(run_cli, home, uri)
    finally:
        _umount(mnt)


@pytest.mark.usefixtures("store_home")
def test_a_claim_that_cannot_be_created_stops_the_sweep(home, run_cli):
    r = _train(run_cli, home, SWEEP, "fail_claim_create@1")
    line = _check_stopped(r.returncode, r.stdout + r.stderr)
    assert "planted fault" in line and "not written: the run's claim" in line, line
    assert [k.info.status for k in _jobs(home, None)] == ["FINISHED"]
    _relaunch_trains_the_rest(run_cli, home, None)


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for a file the job writes (an explicit signal); the timeout only fails loudly."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"bnlab-train ended (rc {proc.returncode}) before writing {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.subprocess
def test_server_dies_after_the_first_job(home, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    signals = tmp_path / "signals"
    signals.mkdir()
    log = tmp_path / "out.txt"
    try:
        proc = subprocess.Popen([str(BIN / "bnlab-train"), *SWEEP, f"tracking.uri={uri}"], cwd=str(home),
                                env=_env(home, "pause_after_job:0", signals), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_file(signals / "after_job_0.reached", proc)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            (signals / "after_job_0.go").write_text("")
            proc.wait(timeout=600)  # a safety timeout; the bound on retries is tested below
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out = log.read_text()
        line = _check_stopped(proc.returncode, out)
        assert f"store {uri} failed" in line, line
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_http_retries_are_bounded_unless_set(monkeypatch):
    # What keeps a dead server from stalling a job for minutes: MLflow's own default is 7 retries
    # with backoff 2 and a 120 s timeout per request. bnlab bounds them; a value set by the user wins.
    from mlflow import environment_variables as mev

    from bnlab.store import HTTP_ENV, bound_http_retries

    for k in HTTP_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    bound_http_retries()
    assert mev.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2
    assert mev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert mev.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 33


# ------------------------------------------------------------------ a busy store is waited out

def test_busy_store_errors_are_retried_and_others_are_not():
    from mlflow.exceptions import MlflowException

    from bnlab.store import RetryingClient

    class Inner:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def _call(self, *a, **k):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return ("ok", a, k)

        set_tag = create_run = _call

    pool = MlflowException("BAD_REQUEST: QueuePool limit of size 4 overflow 2 reached, connection timed out")
    race = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
    slept = []
    inner = Inner([pool, pool, pool])
    assert RetryingClient(inner, wait_s=60, sleep=slept.append).create_run("0", x=1) == ("ok", ("0",), {"x": 1})
    assert inner.calls == 4 and slept == [0.25, 0.5, 1.0]  # backoff doubles
    # a tag written twice at once is retried (the retry updates the row); a run is never created twice
    inner = Inner([race])
    assert RetryingClient(inner, wait_s=60, sleep=slept.append).set_tag("r", "k", "v")[0] == "ok"
    inner = Inner([race])
    with pytest.raises(MlflowException, match="UNIQUE"):
        RetryingClient(inner, wait_s=60, sleep=slept.append).create_run("0")
    assert inner.calls == 1
    # any other error at once; a busy store past the wait: its error stands
    inner = Inner([MlflowException("RESOURCE_ALREADY_EXISTS")])
    with pytest.raises(MlflowException, match="ALREADY"):
        RetryingClient(inner, wait_s=60, sleep=slept.append).create_run("0")
    slept.clear()
    inner = Inner([pool] * 20)
    with pytest.raises(MlflowException, match="QueuePool"):
        RetryingClient(inner, wait_s=5, sleep=slept.append).set_tag("r", "k", "v")
    assert sum(slept[:-1]) < 5 <= sum(slept) and inner.calls == len(slept) + 1


def test_the_store_client_pickles(tmp_path):
    """A tracker (and its client) goes to BackgroundTracker's logging process by pickle."""
    import pickle

    from bnlab.store import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = pickle.loads(pickle.dumps(client(uri)))
    assert c.tracking_uri == uri and callable(c.search_runs)


@pytest.mark.usefixtures("store_home")
def test_a_sweep_waits_out_a_busy_store(home, train_cmd, monkeypatch):
    """The first store calls are answered "busy" (bnlab.faults store_busy, as an MLflow server whose
    connection pool is exhausted answers): the sweep waits, then every grid point runs once."""
    monkeypatch.setenv(faults.ENV, "store_busy:4")
    monkeypatch.setattr(faults, "_busy_calls", [0])
    code, out, err = train_cmd(*SWEEP)
    assert code == 0, out[-2000:] + err[-2000:]
    assert faults._busy_calls[0] > 4  # the fault did answer busy, and calls went on after it
    assert "bnlab-train: 4 finished, 0 failed, 0 skipped, 0 diverged" in out, out[-2000:]
    assert sorted(k.info.status for k in _jobs(home, None)) == ["FINISHED"] * 4


def test_a_sweep_that_cannot_be_set_up_stops_before_any_job(home, train_cmd, monkeypatch):
    """Hydra turns a callback's exception into a warning; bnlab's sweep set-up does not let it."""
    monkeypatch.setenv(faults.ENV, "store_busy:1000")
    monkeypatch.setenv("BNLAB_STORE_BUSY_WAIT_S", "0")
    monkeypatch.setattr(faults, "_busy_calls", [0])
    code, out, err = train_cmd(*SWEEP)
    assert code == 1, out[-2000:] + err[-2000:]
    assert "could not set up the sweep" in err and "QueuePool limit" in err and "no job was run" in err, err
    assert " finished, " not in out
    monkeypatch.delenv(faults.ENV)
    from mlflow.tracking import MlflowClient

    from conftest import store_uri

    exp = MlflowClient(store_uri(home)).get_experiment_by_name("smoke")  # the store was never written
    assert exp is None or MlflowClient(store_uri(home)).search_runs([exp.experiment_id]) == []

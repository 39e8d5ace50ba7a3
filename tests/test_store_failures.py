"""A store that fails in the middle of a sweep (read-only, full, a server that dies): the sweep
stops after the first failure with one clear line, counts what was not run, exits non-zero, and
a dead server costs seconds, not minutes. Real file systems: a small tmpfs (needs root to mount)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, free_port, mlflow_server, runs_of

FAST = ["train.threads=1"]
# Eight jobs of about a second each: time enough to break the store after the first one.
SWEEP = ["study=smoke", "seed=0,1,2,3", "train.epochs=20", "data.synthetic_train=1024", *FAST]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]}): needs root")


def _umount(path: Path) -> None:
    subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _launch(home: Path, args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(BIN / "bnlab-train"), *args], cwd=str(home), env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_finished(home: Path, uri: str, proc: subprocess.Popen, n: int = 1, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before the store could be broken"
        try:
            _, runs = runs_of(home, "smoke", uri=uri)
            if sum(r.info.status == "FINISHED" and r.data.tags.get("bnlab.role") == "job" for r in runs) >= n:
                return
        except Exception:  # the experiment is not there yet
            pass
        time.sleep(0.3)
    raise AssertionError("no FINISHED run in time")


def _check_stopped(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=600)
    out = log.read_text()
    assert proc.returncode == 1, out[-3000:]
    summary = [ln for ln in out.splitlines() if ln.startswith("bnlab-train: ") and " finished, " in ln]
    assert len(summary) == 1, out[-3000:]
    line = summary[0]
    assert "stopped after the first store failure" in line and "job(s) not run" in line, line
    # one job met the failure, the rest did not start: no traceback per job
    assert out.count("Traceback") == 0, out[-3000:]
    assert out.count("not run: the store failed earlier") >= 1, out[-3000:]
    return line


def test_store_turns_read_only_mid_sweep(home, tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "64m")
    try:
        uri = f"sqlite:///{mnt / 'store' / 'mlflow.db'}"
        log = tmp_path / "out.txt"
        proc = _launch(home, [*SWEEP, f"tracking.uri={uri}"], log)
        try:
            _wait_finished(home, uri, proc)
            # Root ignores file modes: the immutable flag makes the folder and the file read-only
            # for everyone (SQLite cannot create its journal, nor write the file).
            subprocess.run(["chattr", "+i", str(mnt / "store" / "mlflow.db"), str(mnt / "store")], check=True)
            line = _check_stopped(proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert "0 skipped" in line
        n_fin = int(line.split(" finished")[0].split()[-1])
        assert 1 <= n_fin < 8, line
        assert "could not record the sweep's counts" in log.read_text()
    finally:
        _umount(mnt)


def test_disk_full_mid_sweep(home, tmp_path):
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "16m")
    try:
        uri = f"sqlite:///{mnt / 'mlflow.db'}"
        log = tmp_path / "out.txt"
        proc = _launch(home, [*SWEEP, f"tracking.uri={uri}"], log)
        try:
            _wait_finished(home, uri, proc)
            # fill the file system to the last byte
            subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=64k"], capture_output=True)
            line = _check_stopped(proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert "full" in line.lower(), line
        (mnt / "filler").unlink()
        # the runs the full disk left RUNNING belong to a dead process: a relaunch ends them KILLED
        # and trains the rest, each grid point exactly once
        r = subprocess.run([str(BIN / "bnlab-train"), *SWEEP, f"tracking.uri={uri}"], cwd=str(home),
                           env={**os.environ, "BNLAB_HOME": str(home)}, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        _, runs = runs_of(home, "smoke", uri=uri)
        kids = [k for k in runs if k.data.tags.get("bnlab.role") == "job"]
        fin = [k.data.tags["bnlab.config_hash"] for k in kids if k.info.status == "FINISHED"]
        assert len(fin) == 8 and len(set(fin)) == 8
        assert not [k for k in kids if k.info.status == "RUNNING"]
    finally:
        _umount(mnt)


def test_server_dies_mid_sweep_bounded_time(home, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    try:
        log = tmp_path / "out.txt"
        proc = _launch(home, [*SWEEP, f"tracking.uri={uri}"], log)
        try:
            _wait_finished(home, uri, proc)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            t0 = time.time()
            line = _check_stopped(proc, log)
            print(f"sweep ended {time.time() - t0:.1f} s after the server died")
            # MLflow's default (7 retries, 120 s timeout) blocks about 4 minutes per request
            assert time.time() - t0 < 60, f"took {time.time() - t0:.0f} s after the server died"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert f"store {uri} failed" in line, line
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

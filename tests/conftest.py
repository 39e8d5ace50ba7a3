"""Shared fixtures: a temporary project home (store, Hydra folders) and a CLI runner."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh BNLAB_HOME: its runs/ holds the SQLite store and Hydra's job folders."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("BNLAB_HOME", str(h))
    return h


def cli(script: str, *args: str, home: Path, timeout: float = 600, cwd: Path | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script in a subprocess, from another directory than the project."""
    e = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd or home), env=e)


def store_uri(home: Path) -> str:
    return f"sqlite:///{home / 'runs' / 'mlflow.db'}"


def runs_of(home: Path, experiment: str, uri: str | None = None):
    """Every run of an experiment (parents included), via MlflowClient."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri or store_uri(home))
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} not found"
    return c, c.search_runs([exp.experiment_id], max_results=10000)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(tmp_path: Path, port: int, workers: int = 1) -> subprocess.Popen:
    """A loopback `mlflow server` over a temporary SQLite store, in its own session (kill its group),
    without MLflow's GenAI job workers; returns once /health answers (90 s at most)."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start")
            time.sleep(1)


# ------------------------------------------------------------------ study stores (tests/study_stores.py)

@pytest.fixture(scope="session")
def study_store(tmp_path_factory):
    """One SQLite store per session holding every study of the config directory, each from its own
    YAML at smoke size (tests/study_stores.py): (uri, home, {study: runs})."""
    from study_stores import build_store, study_names

    home = tmp_path_factory.mktemp("study_store")
    old = os.environ.get("BNLAB_HOME")
    try:
        counts = build_store(home, study_names(), log=lambda *a: None)
    finally:  # the store is read by its URI: the environment is as it was for every other test
        if old is None:
            os.environ.pop("BNLAB_HOME", None)
        else:
            os.environ["BNLAB_HOME"] = old
    return f"sqlite:///{home / 'runs' / 'mlflow.db'}", home, counts

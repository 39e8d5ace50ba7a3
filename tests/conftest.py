"""Shared fixtures: a temporary project home (store, Hydra folders) and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
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

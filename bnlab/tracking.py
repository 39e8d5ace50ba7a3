"""The only module that writes to MLflow: the project's store, experiments, and a run tracker
that logs one batch of metrics per epoch. train() receives a tracker; it never imports mlflow."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

TAG = "bnlab."  # prefix of every bnlab tag


def project_home() -> Path:
    """$BNLAB_HOME, else the checkout this package lives in (editable install), else ~/.bnlab."""
    env = os.environ.get("BNLAB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file():
        return here
    return Path.home() / ".bnlab"


def default_uri() -> str:
    """The project's SQLite store, at a fixed absolute path whatever the working directory."""
    return f"sqlite:///{project_home() / 'runs' / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_home() / "runs" / "artifacts"


def resolve_uri(uri: Optional[str]) -> str:
    return uri or default_uri()


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def client(uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: Optional[str], name: str) -> str:
    """Create the store (schema migration) and the experiment once; return its id. Parallel jobs
    call this only after the sweep callback did it, so they never race on a fresh store."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    kwargs = {}
    if _is_local(resolve_uri(uri)):
        # A SQLite store's default artifact root is ./mlartifacts of the working directory:
        # pin it inside the project so artifacts land beside the store wherever a run starts.
        kwargs["artifact_location"] = (artifact_root() / name).as_uri()
    try:
        return c.create_experiment(name, **kwargs)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_info() -> Dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside a git checkout)."""
    home = project_home()
    try:
        sha = subprocess.run(["git", "-C", str(home), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(home), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return {TAG + "git_commit": sha or "unknown", TAG + "git_dirty": str(bool(dirty)).lower()}


def owner_tags() -> Dict[str, str]:
    """Who runs this run: lets a relaunch tell a dead run (process gone) from a live one."""
    return {TAG + "host": socket.gethostname(), TAG + "pid": str(os.getpid())}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NullTracker:
    """Logs nothing: for library use and tests that need no store."""

    run_id: Optional[str] = None

    def start(self, params: Mapping[str, object], tags: Mapping[str, str], config_text: str) -> None:
        pass

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str, error: Optional[str] = None) -> None:
        pass

    def where(self) -> str:
        return "not logged"


class MlflowTracker:
    """One MLflow run, written through MlflowClient (no global fluent state)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: str,
                 parent_run_id: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.run_id: Optional[str] = None
        self._client = None

    def start(self, params: Mapping[str, object], tags: Mapping[str, str], config_text: str) -> None:
        from mlflow.entities import Param

        self._client = client(self.uri)
        exp_id = ensure_experiment(self.uri, self.experiment)
        all_tags = {**tags, **owner_tags()}
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self._client.create_run(exp_id, run_name=self.run_name, tags=all_tags)
        self.run_id = run.info.run_id
        # MLflow caps a param value at 6000 characters; one batch call for all of them.
        ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(ps), 100):
            self._client.log_batch(self.run_id, params=ps[i:i + 100])
        self._client.log_text(self.run_id, config_text, "config.yaml")

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every metric of one epoch in a single call (one SQLite transaction / HTTP request)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str, error: Optional[str] = None) -> None:
        if self.run_id is None:
            return
        if error:
            self.set_tags({TAG + "error": error[:5000]})
        self._client.set_terminated(self.run_id, status=status)

    def where(self) -> str:
        if self.run_id is None:
            return "no run"
        exp = self._client.get_experiment_by_name(self.experiment)
        return (f"experiment '{self.experiment}' (id {exp.experiment_id}), run {self.run_id} "
                f"'{self.run_name}' in {self.uri}")


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))

"""Where a project's MLflow store is and how bnlab talks to it: the project folder and store URI
(tracking.uri, $MLFLOW_TRACKING_URI, else <project>/runs/mlflow.db), the client every bnlab module
uses (bounded HTTP retries; calls retried while the store is busy), a cross-process lock around
SQLite store creation and claims, the experiment created once, and the tags that say who runs a run
and which code it is. bnlab.tracking writes the runs themselves."""
from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

from bnlab import faults

TAG = "bnlab."  # prefix of every bnlab tag
MODEL_ARTIFACT = "model.pt"  # a finished run's model: torch.save({"state_dict", "config"}) (bnlab/load.py)
MODEL_SOURCE = "model_source"  # model=custom: the module that defines model.target (artifact folder)
log = logging.getLogger("bnlab")


def project_home() -> Path:
    """The project folder: $BNLAB_HOME, else the working directory (bnlab's own checkout when
    `make study` runs there). It holds runs/ (the store, Hydra's job folders, artifacts, data
    caches), results/ (the report) and conf/ (the project's own studies, models, datasets)."""
    env = os.environ.get("BNLAB_HOME")
    return Path(env).expanduser().resolve() if env else Path.cwd().resolve()


def default_uri() -> str:
    """The project's SQLite store <project>/runs/mlflow.db, as an absolute path."""
    return f"sqlite:///{project_home() / 'runs' / 'mlflow.db'}"


def artifact_root(uri: Optional[str] = None) -> Path:
    """Where a local store's artifacts go: the folder artifacts/ beside its SQLite file (for the
    default store <project>/runs/artifacts), so they follow the store wherever a run starts."""
    path = sqlite_path(uri)
    return (path.parent if path is not None else project_home() / "runs") / "artifacts"


def resolve_uri(uri: Optional[str]) -> str:
    """The store a run logs to: tracking.uri, else $MLFLOW_TRACKING_URI (MLflow's own convention),
    else the project's SQLite store. A relative SQLite path is relative to the working directory
    (as MLflow reads it) and is returned absolute."""
    u = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    if u.startswith("sqlite:///") and not u.startswith("sqlite:////") and u != "sqlite:///:memory:":
        u = f"sqlite:///{Path.cwd().resolve() / u[len('sqlite:///'):]}"
    return u


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def is_http(uri: Optional[str]) -> bool:
    return resolve_uri(uri).startswith(("http://", "https://"))


def sqlite_path(uri: Optional[str]) -> Optional[Path]:
    uri = resolve_uri(uri)  # absolute
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class StoreError(RuntimeError):
    """The tracking store could not be written or read (read-only, disk full, server gone): the
    message says what and, where it applies, what was not written."""


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost exception (MLflow wraps the database's own words)."""
    inner = e
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    lines = [ln for ln in str(inner).splitlines() if ln.strip()]
    return f"{type(inner).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


class _NoDbErrorTraces(logging.Filter):
    # MLflow logs every failed database call with a full traceback before raising it; bnlab
    # reports the error itself, in one line.
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _quiet_db_errors() -> None:
    lg = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _NoDbErrorTraces) for f in lg.filters):
        lg.addFilter(_NoDbErrorTraces())


# MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes) and
# waits 120 s per request by default: a dead server would stall a job for minutes. Seconds here;
# a value already in the environment wins.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_retries() -> None:
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


_LOCKS: Dict[str, object] = {}


def store_lock(uri: Optional[str], timeout_s: float = 300.0):
    """A lock shared by every process on this machine (a file beside a SQLite store) around store
    creation/migration and grid-point claims; a no-op for a server, which serialises itself.
    Re-entrant within a process (one FileLock object per store, which counts its holders)."""
    path = sqlite_path(uri)
    if path is None:
        return nullcontext()
    from filelock import FileLock

    key = str(path) + ".lock"
    if key not in _LOCKS:
        path.parent.mkdir(parents=True, exist_ok=True)
        _LOCKS[key] = FileLock(key, timeout=timeout_s)
    return _LOCKS[key]


# A store that is busy answers with an error that means "try again": nothing was written. A
# server's connection pool was exhausted for its whole pool timeout (MLflow returns SQLAlchemy's
# error as 400 BAD_REQUEST, which its client does not retry), PostgreSQL refused a connection, or
# SQLite stayed locked. Every client call is retried on these, with backoff, for up to
# $BNLAB_STORE_BUSY_WAIT_S seconds (BUSY_WAIT_S by default); then the error stands.
BUSY = ("QueuePool limit of size", "too many clients already", "too many connections",
        "remaining connection slots are reserved", "database is locked")
# Two writers setting the same tag at once: the loser's INSERT hits the unique key the winner just
# wrote. Retried only where the call is idempotent (the retry updates the row to the same value).
RACED = ("UNIQUE constraint failed", "duplicate key value violates unique constraint")
IDEMPOTENT = frozenset({"set_tag", "set_experiment_tag"})
BUSY_WAIT_ENV, BUSY_WAIT_S = "BNLAB_STORE_BUSY_WAIT_S", 300.0


def busy_reason(method: str, e: BaseException) -> Optional[str]:
    """The pattern that makes `e` (raised by MlflowClient.<method>) safe to retry, else None."""
    text = str(e)
    for pat in BUSY + (RACED if method in IDEMPOTENT else ()):
        if pat in text:
            return pat
    return None


class RetryingClient:
    """MlflowClient whose calls retry while the store is busy (see BUSY); anything else is raised
    at once. Attributes that are not methods pass through."""

    def __init__(self, inner, wait_s: Optional[float] = None, sleep=time.sleep):
        if wait_s is None:
            wait_s = float(os.environ.get(BUSY_WAIT_ENV, BUSY_WAIT_S))
        self._inner, self._wait_s, self._sleep = inner, wait_s, sleep

    def __getattr__(self, name: str):
        if name.startswith("_"):  # own fields not set yet (unpickling), dunders: not the inner client's
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            waited, delay = 0.0, 0.25
            while True:
                try:
                    faults.point("store_call", method=name)
                    return attr(*args, **kwargs)
                except Exception as e:
                    why = busy_reason(name, e)
                    if why is None or waited >= self._wait_s:
                        raise
                    log.warning("store busy (%s) in %s; retrying in %.1f s", why, name, delay)
                    self._sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 8.0)

        return call


def client(uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    bound_http_retries()
    _quiet_db_errors()
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return RetryingClient(MlflowClient(tracking_uri=uri))


def ensure_experiment(uri: Optional[str], name: str) -> str:
    """Create the store (schema migration) and the experiment once; return its id. Under the
    store lock: processes that open a fresh SQLite store at once never race on its migration."""
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
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
            kwargs["artifact_location"] = (artifact_root(uri) / name).as_uri()
        try:
            return c.create_experiment(name, **kwargs)
        except MlflowException:  # created meanwhile by another process (over HTTP)
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def git_info() -> Dict[str, str]:
    """The code that runs: bnlab's version, and the commit and dirty flag of the git checkout bnlab
    is installed from (editable), 'unknown' for an installed wheel or sdist."""
    from bnlab import __version__
    from bnlab.describe import code_commit, code_dirty, code_root

    if code_root() is None:
        return {TAG + "version": __version__, TAG + "git_commit": "unknown", TAG + "git_dirty": "unknown"}
    dirty = code_dirty()
    return {TAG + "version": __version__, TAG + "git_commit": code_commit() or "unknown",
            TAG + "git_dirty": "unknown" if dirty is None else str(dirty).lower()}


def owner_tags() -> Dict[str, str]:
    """Who runs this run: lets a relaunch tell a dead run (process gone) from a live one."""
    return {TAG + "host": socket.gethostname(), TAG + "pid": str(os.getpid())}


def heartbeat_tag() -> Dict[str, str]:
    """Unix time of the run's last sign of life: a claim older than the timeout can be taken over."""
    return {TAG + "heartbeat": f"{time.time():.0f}"}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

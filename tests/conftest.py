"""Shared fixtures: a temporary project home (store, Hydra folders), the config tree and Hydra's
compose API for in-process tests, and a runner for the few tests that start the console scripts."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]  # the checkout: README.md, experiments/
# The one place the tests know where the Hydra config tree lives.
CONF_DIR = ROOT / "bnlab" / "conf"  # the packaged config tree (pkg://bnlab.conf)
STUDIES = sorted(p.stem for p in (CONF_DIR / "study").glob("*.yaml"))

# A shell without job control starts background commands (`cmd &`, `nohup`) with SIGINT ignored,
# and a Python process that starts with SIGINT ignored never turns it into KeyboardInterrupt: the
# Ctrl-C tests would then test nothing. The test process takes Python's own handler, so every
# console script it starts begins with SIGINT at its default (a caught signal is reset by exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh BNLAB_HOME: its runs/ holds the SQLite store and Hydra's job folders."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("BNLAB_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An empty SQLite store as MLflow first creates it (its schema migrated, its Default
    experiment), made once per pytest worker: creating one costs about 1 CPU-second."""
    path = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    from bnlab.store import client

    client(f"sqlite:///{path}").search_experiments()  # the first call opens the store: migrations
    return path


@pytest.fixture
def store_home(home, _migrated_store) -> Path:
    """`home` whose default store already exists: a copy of the migrated empty store, as the first
    bnlab-train started in `home` would have left it before its first experiment. For tests of what
    runs do to a store, not of how a store is created (those, and the tests that check that nothing
    was written, take `home`)."""
    import shutil
    import sqlite3

    db = home / "runs" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(_migrated_store, db)
    # The Default experiment (bnlab never writes to it) points where MLflow would have put it: the
    # mlruns/ of the creating process's working folder, here `home`.
    with sqlite3.connect(db) as con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(home / "mlruns" / "0"),))
    con.close()
    return home


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
    from bnlab.ui import wait_ready

    why = wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=90)  # bnlab-ui's own readiness check
    if why:
        proc.kill()
        raise RuntimeError(f"mlflow server did not start: {why}")
    return proc


# ----------------------------------------------------------------------------- in-process runs

def compose(overrides=(), hydra: bool = False):
    """The real config tree composed with Hydra's compose API (as lightning-hydra-template's tests
    do); with hydra=True the `hydra` node too, as a job would see it."""
    from hydra import compose as _compose, initialize_config_dir

    from bnlab.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return _compose("train", overrides=list(overrides), return_hydra_config=hydra)


def run_job(*overrides: str):
    """One `bnlab-train OVERRIDES` job in this process: the composed config, Hydra's job context
    set as Hydra sets it, then bnlab.cli's task (typed config, tracker, train). Returns its metrics."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from bnlab import cli as bcli

    bcli._prepare_env()
    full = compose(overrides, hydra=True)
    HydraConfig.instance().set_config(full)
    try:
        with open_dict(full):
            del full["hydra"]
        return bcli._task(full)
    finally:
        HydraConfig.instance().cfg = None


def main_exit(main, *args: str) -> int:
    """A console script's main(argv) in this process; its exit status (what it returns, as the
    console script's sys.exit(main()) makes it: 0 for None)."""
    try:
        rc = main(list(args))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc if isinstance(rc, int) else 0


def _script_main(script: str):
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    return ep.load()


def in_process(script: str, *args: str, home: Path, cwd: Path | None = None, env: dict | None = None) -> int:
    """A console script's main (the entry point the package declares) in this process, with cli()'s
    BNLAB_HOME, working folder and extra environment (a PYTHONPATH in `env` goes on sys.path); its
    exit status. The environment, sys.path, sys.argv, the working folder and the modules imported
    from the extra PYTHONPATH are restored after the call. What it prints goes to this process's
    stdout and stderr (run_cli captures them)."""
    main = _script_main(script)
    extra = {**(env or {})}
    paths = [p for p in extra.pop("PYTHONPATH", "").split(os.pathsep) if p]
    saved = (dict(os.environ), list(sys.path), list(sys.argv), os.getcwd(), set(sys.modules))
    try:
        os.environ.update({"BNLAB_HOME": str(home), **extra})
        sys.path[:0] = paths
        sys.argv = [script, *args]
        os.chdir(cwd or home)
        return main_exit(main, *args)
    finally:
        environ, path, argv, where, modules = saved
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:], sys.argv[:] = path, argv
        os.chdir(where)
        for name in set(sys.modules) - modules:  # a test's own model module, e.g. faultynet
            f = getattr(sys.modules[name], "__file__", None) or ""
            if any(f.startswith(p) for p in paths):
                del sys.modules[name]


@pytest.fixture
def run_cli(capsys):
    """cli()'s twin in this process (in_process): a CompletedProcess with the exit status and what
    the call printed. For tests of what a run does, not of what a process does (signals, kills,
    concurrency, start-up): those use cli(). (`timeout` is cli()'s and not applied here: an
    in-process call cannot be stopped from outside.)"""

    def run(script: str, *args: str, home: Path, timeout: float = 600, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        capsys.readouterr()  # what the test printed before is not this call's
        code = in_process(script, *args, home=home, cwd=cwd, env=env)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out.out, out.err)

    return run


@pytest.fixture
def train_cmd(home, monkeypatch, run_cli):
    """bnlab-train in this process (run_cli) in `home`: (exit status, stdout, stderr)."""
    from bnlab.store import HTTP_ENV

    for k in HTTP_ENV:
        monkeypatch.delenv(k, raising=False)

    def run(*args: str):
        r = run_cli("bnlab-train", *args, home=home)
        return r.returncode, r.stdout, r.stderr

    return run


# ----------------------------------------------------------------------------- bnlab-ui, a real process

class UI:
    """A bnlab-ui process whose output lines are collected as they come; wait_for() wakes on each
    new line (or on the process's end), so it waits for what the UI prints, not for a time window."""

    def __init__(self, home: Path, *args: str, cwd: Path | None = None):
        import threading

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(BIN / "bnlab-ui"), "--port", str(self.port), "--workers", "1", *args],
                                     cwd=str(cwd or home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._new = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for x in self.proc.stdout:
            with self._new:
                self.lines.append(x.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.eof = True
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120):
        """The first output line matching pattern; fails at once if the UI's output ends first,
        and after `timeout` seconds (a safety limit) if nothing matches."""
        import re

        def found():
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            return None

        with self._new:
            ok = self._new.wait_for(lambda: found() or getattr(self, "eof", False), timeout)
            m = found()
        assert m, (f"no line matching {pattern!r} " + ("before bnlab-ui's output ended" if ok else
                   f"within {timeout} s") + ":\n" + "\n".join(self.lines))
        return m

    def get(self, endpoint: str, **query):
        import json
        import urllib.parse

        url = f"{self.base}{endpoint}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
        return json.loads(body) if endpoint.startswith("/api/") else body

    def post(self, path: str, payload: dict):
        import json

        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def server_pid(self) -> int:
        return int(self.wait_for(r"MLflow server pid (\d+)").group(1))

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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


# ----------------------------------------------------------------------------- pytest-xdist

# `make test` runs the suite on several pytest-xdist workers. The tests of these modules share an
# expensive module- or session-scoped fixture (a SLURM cluster; a PostgreSQL server and its
# bnlab-ui; a served smoke store; the study store; the analysis store; one mlflow server): each
# module runs on one worker, so its fixture is built once, not once per worker. Every other test is scheduled alone.
ONE_WORKER = ("test_slurm.py", "test_postgres.py", "test_ui.py", "test_report_dynamics.py", "test_analysis.py",
              "test_http_store.py")


def pytest_xdist_make_scheduler(config, log):
    """--dist load with the ONE_WORKER modules as single work units (pytest-xdist's own loadgroup
    marks are not read under pytest 9: it renames items through an attribute pytest 9 dropped)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # the collection's order: see below

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.rsplit("/", 1)[-1] in ONE_WORKER else nodeid

    return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the longest work goes first and the in-process tests fill the end (a
    stable sort: the order within each kind stays the collection's): the one-worker modules, then
    the cluster and subprocess tests, then the rest."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def kind(item):
        if item.path.name in ONE_WORKER:
            return 0
        return 1 if item.get_closest_marker("cluster") or item.get_closest_marker("subprocess") else 2

    items.sort(key=kind)

"""bnlab-ui: an MLflow tracking server and UI over the project's store, run in its own process
group so that Ctrl-C or SIGTERM stops all of it; prints each study's runs-table URL and the
MLFLOW_TRACKING_URI line for MLflow's own tools once the server answers."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

READY_TIMEOUT_S = 120.0  # an MLflow 3.x server with a fresh SQLite store migrates it first
STOP_TIMEOUT_S = 10.0  # then SIGKILL the process group


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> Optional[str]:
    """The warning for a UI reachable from other machines (None on loopback)."""
    if is_loopback(host):
        return None
    return (f"bnlab-ui: warning: --host {host} makes the UI and its REST API reachable from the "
            f"network; it has no authentication: anyone who can reach this port can read, change and "
            f"delete runs. Use it only on a trusted network.")


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on host:port (a bind with SO_REUSEADDR, as uvicorn does, fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _connect_host(host: str) -> str:
    # A server bound to every interface is reached locally on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def base_url(host: str, port: int) -> str:
    h = _connect_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = READY_TIMEOUT_S) -> Optional[str]:
    """None once the server answers /health; else why not (it exited, or the timeout)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        code = proc.poll()
        if code is not None:
            return f"the MLflow server exited with code {code} before answering"
        try:
            _get(f"{url}/health", timeout=2.0)
            return None
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.3)
    return f"the MLflow server did not answer within {timeout_s:.0f} s"


def experiments(url: str) -> List[Tuple[str, str]]:
    """(name, id) of every active experiment but MLflow's Default, through the REST API."""
    data = json.loads(_get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1000"))
    exps = data.get("experiments", [])
    return sorted((e["name"], e["experiment_id"]) for e in exps if e.get("name") != "Default")


def stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminate the server's whole process group (the MLflow CLI and its uvicorn workers)."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + timeout_s
            while time.monotonic() < end and _group_alive(proc.pid):
                proc.poll()  # reap the leader so that the group can vanish
                time.sleep(0.1)
            if not _group_alive(proc.pid):
                break
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """In the server process before exec (Linux): SIGTERM it when bnlab-ui dies, even by SIGKILL;
    the MLflow CLI then stops its uvicorn workers itself (measured here)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# A database server (PostgreSQL, MySQL) limits connections (PostgreSQL: 100 by default), and each
# uvicorn worker of `mlflow server` holds its own SQLAlchemy pool (SQLAlchemy's default: 5 + 10
# overflow). bnlab-ui caps it per worker; requests beyond wait for a free connection (pool timeout
# 30 s). Values already in the environment win.
POOL_SIZE, MAX_OVERFLOW = "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"
DB_POOL = {POOL_SIZE: "4", MAX_OVERFLOW: "2"}


def db_pool_env(store: str, env: dict) -> Optional[int]:
    """For a database store, set the pool bounds in `env`; returns connections per worker."""
    if store.split(":", 1)[0].split("+")[0] not in ("postgresql", "mysql", "mssql"):
        return None
    for k, v in DB_POOL.items():
        env.setdefault(k, v)
    return int(env[POOL_SIZE]) + int(env[MAX_OVERFLOW])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bnlab-ui", description=main.__doc__)
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--host", default="127.0.0.1", help="loopback by default; the UI has no authentication")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend-store-uri", default=None, help="default: the project's SQLite store")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    """bnlab-ui: the MLflow UI (an MLflow tracking server) on 127.0.0.1 over the project's store.
    Runs may also log through it: tracking.uri=http://127.0.0.1:PORT."""
    from bnlab.store import artifact_root, default_uri, resolve_uri

    a = build_parser().parse_args(argv)
    if not 1 <= a.port <= 65535:
        print(f"bnlab-ui: error: --port must be in 1..65535, got {a.port}", file=sys.stderr)
        sys.exit(2)
    if a.workers < 1:
        print(f"bnlab-ui: error: --workers must be >= 1, got {a.workers}", file=sys.stderr)
        sys.exit(2)
    warning = host_warning(a.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if port_in_use(a.host, a.port):
        print(f"bnlab-ui: error: port {a.port} on {a.host} is in use (another bnlab-ui? pick one with "
              f"--port)", file=sys.stderr)
        sys.exit(1)
    store = a.backend_store_uri or resolve_uri(None)  # $MLFLOW_TRACKING_URI, else the project's store
    if store.startswith(("http://", "https://")):  # a server is already running: serve the project's store
        store = default_uri()
    if store.startswith("sqlite:///"):
        Path(store[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
           "--artifacts-destination", str(artifact_root(store)), "--host", a.host, "--port", str(a.port),
           "--workers", str(a.workers)]
    # MLflow 3.x servers start a pool of GenAI job workers by default: seconds of CPU for nothing here.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    bound = db_pool_env(store, env)
    if bound:
        print(f"bnlab-ui: runs write through at most {bound * a.workers} database connections ({a.workers} "
              f"workers x pool {env[POOL_SIZE]} + overflow {env[MAX_OVERFLOW]}), beside the few the server "
              f"opens at start-up", flush=True)
    url = base_url(a.host, a.port)
    print(f"bnlab-ui: starting the MLflow UI on {url} over {store} ...", flush=True)
    # Its own session and process group: a terminal's Ctrl-C reaches only this process, which then
    # stops the whole group (the MLflow CLI and its uvicorn workers): no orphan keeps the port.
    # A SIGKILL of bnlab-ui cannot be caught: the kernel then signals the server (_die_with_parent).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    stopping = {"sig": None}

    def on_signal(signum, frame):
        stopping["sig"] = signum
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        why = wait_ready(url, proc)
        if why:
            print(f"bnlab-ui: error: {why}", file=sys.stderr)
            stop(proc)
            sys.exit(1)
        print(f"bnlab-ui: MLflow UI on {url} (MLflow server pid {proc.pid}); stop it with Ctrl-C or "
              f"`kill {os.getpid()}`", flush=True)
        try:
            exps = experiments(url)
        except (urllib.error.URLError, OSError, ValueError) as e:
            exps = []
            print(f"bnlab-ui: could not list the experiments: {e}", file=sys.stderr)
        if exps:
            from bnlab.describe import runs_url

            print("bnlab-ui: each study's runs table:", flush=True)
            width = max(len(n) for n, _ in exps)
            for name, eid in exps:
                print(f"  {name:<{width}}  {runs_url(url, eid)}", flush=True)
        else:
            print("bnlab-ui: no experiments yet (bnlab-train study=smoke makes one)", flush=True)
        print("bnlab-ui: MLflow's own CLI and Python API on the same store:", flush=True)
        print(f"export MLFLOW_TRACKING_URI={store}", flush=True)
        code = proc.wait()
        stop(proc)  # the server ended by itself: leave none of its workers behind
        sys.exit(code)
    except KeyboardInterrupt:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop(proc)
        print(f"bnlab-ui: stopped ({signal.Signals(stopping['sig'] or signal.SIGINT).name})", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    main()

"""Throw-away services for the `cluster` tests: a PostgreSQL cluster on loopback and a one-node
SLURM cluster (slurmctld + slurmd + munge), both from Debian packages that .ci/run installs.
Each helper skips the test with the reason when its packages are missing."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import pytest

from conftest import free_port

BIN = Path(sys.executable).parent


def _as_service_user(cmd: List[str]) -> List[str]:
    # PostgreSQL refuses to run as root: run it as the `postgres` account (Debian's package makes
    # it), else `nobody`.
    if os.geteuid() != 0:
        return cmd
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--", *cmd]
        except KeyError:
            continue
    pytest.skip("running as root and neither a `postgres` nor a `nobody` account exists")


def _service_owner() -> Optional[pwd.struct_passwd]:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(user)
        except KeyError:
            continue
    return None


def pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    return found[-1].parent


@contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 (a free port, trust auth, fsync off) with an empty
    database `mlflow`; yields its URI, stops and deletes it at the end."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[cluster]')")
    bindir = pg_bindir()
    d = Path(tempfile.mkdtemp(prefix="bnlab-pg-"))
    owner = _service_owner()
    if owner is not None:
        os.chown(d, owner.pw_uid, owner.pw_gid)
    data, port = d / "data", free_port()
    run = lambda *cmd: subprocess.run(_as_service_user([str(bindir / cmd[0]), *cmd[1:]]), check=True,
                                      capture_output=True, text=True, timeout=120)
    started = False
    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "bnlab", "-E", "UTF8", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(d / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300", "start")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "bnlab", "mlflow")
        yield f"postgresql://bnlab@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            subprocess.run(_as_service_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                             "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def process_tree(root: int) -> List[int]:
    """`root` and its live descendants (from /proc/*/stat)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def db_connections(pids: Iterable[int], db_port: int) -> dict:
    """{pid: its ESTABLISHED TCP connections to port `db_port`} for each of `pids`, counted on the
    client side (each process's socket fds against /proc/net/tcp): pg_stat_activity would also count
    other clients' connections and a closed one whose backend has not exited yet."""
    ours = set()  # the inodes of the sockets to db_port (this machine's one network namespace)
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()  # f[2]: remote address:port (hex), f[3]: state (01 = ESTABLISHED), f[9]: inode
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == db_port:
                ours.add(f"socket:[{f[9]}]")
    counts = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    n += os.readlink(f"/proc/{pid}/fd/{fd}") in ours
                except OSError:
                    pass  # closed meanwhile
        except OSError:
            continue  # the process went away
        counts[pid] = n
    return counts


@contextmanager
def bnlab_ui(store: str, workers: int = 4, env: Optional[dict] = None) -> Iterator[tuple]:
    """`bnlab-ui --backend-store-uri STORE` on a free loopback port; yields (its URL, its pid) once it
    answers."""

    port = free_port()
    # The server's log goes to a file: a pipe nobody reads fills up (64 KB of access log lines under
    # load) and then blocks every server worker on its next log write.
    logf = tempfile.NamedTemporaryFile("w+", prefix="bnlab-ui-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(BIN / "bnlab-ui"), "--backend-store-uri", store, "--port", str(port),
                             "--workers", str(workers)], stdout=logf, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        from bnlab.ui import wait_ready

        why = wait_ready(url, proc, timeout_s=180)  # bnlab-ui's own readiness check
        if why:
            logf.seek(0)
            raise RuntimeError(f"bnlab-ui did not start ({why}): " + logf.read()[-3000:])
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logf.close()
        os.unlink(logf.name)


SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name)
                                       if p.exists()), None)


def _node() -> dict:
    """This machine as slurmd sees it (`slurmd -C`: NodeName=vm CPUs=2 ... RealMemory=24105)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return {k: fields[k] for k in ("NodeName", "CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                   "ThreadsPerCore", "RealMemory") if k in fields}


@contextmanager
def slurm() -> Iterator[dict]:
    """A one-node SLURM cluster on this machine: a private munged, slurmctld and slurmd on free
    ports with their state in a temporary folder, no accounting (no slurmdbd: sacct has nothing).
    Yields {"env": variables that point sbatch/squeue/... at it, "partition", "start_s"}."""
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge, "
                    f"as .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs slurmd as root (cgroup-free, proctrack/pgid)")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        pytest.skip("munge has no key (/etc/munge/munge.key; the munge package creates it)")
    t0 = time.time()
    d = Path(tempfile.mkdtemp(prefix="bnlab-slurm-"))
    os.chmod(d, 0o755)
    shutil.copy(key, d / "munge.key")
    os.chmod(d / "munge.key", 0o600)
    sock = d / "munge.socket"
    node = _node()
    mem_per_cpu = max(100, int(node.get("RealMemory", "2048")) // (4 * int(node.get("CPUs", "1"))))
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=bnlab", "SlurmctldHost=localhost", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        # cred_expire (default 120 s) is also how long a requeued job waits before it may start again
        # (slurm.conf(5)): 20 s keeps the requeue test short and still covers a slow step launch.
        "AuthType=auth/munge", f"AuthInfo=socket={sock},cred_expire=20", "CredType=cred/munge",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        # array tasks side by side: consumable cores and memory, a default memory per CPU
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", f"DefMemPerCPU={mem_per_cpu}",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "MpiDefault=none", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill", "KillWait=5", "InactiveLimit=0", "MinJobAge=30",
        # submitit requeues a preempted or timed-out task with `scontrol requeue` (1 is the default)
        "JobRequeue=1",
        "SlurmctldTimeout=30", "SlurmdTimeout=30",
        " ".join(f"{k}={v}" for k, v in node.items()) + " NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=debug Nodes={node['NodeName']} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    env = {"SLURM_CONF": str(conf)}
    full_env = {**os.environ, **env}
    procs: List[subprocess.Popen] = []
    try:
        subprocess.run([_which("munged"), "--force", f"--socket={sock}", f"--key-file={d / 'munge.key'}",
                        f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                        f"--seed-file={d / 'munge.seed'}"], check=True, capture_output=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([_which(daemon), "-D", "-f", str(conf)], env=full_env,
                                          stdout=open(d / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.time() + 60
        while True:
            r = subprocess.run([_which("sinfo"), "-h", "-o", "%t"], env=full_env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix"):
                break
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                logs = "".join((d / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                               if (d / f).exists())
                raise RuntimeError(f"the one-node SLURM cluster did not come up: {r.stdout} {r.stderr}\n{logs}")
            time.sleep(0.5)
        yield {"env": env, "partition": "debug", "start_s": time.time() - t0, "dir": d}
    finally:
        subprocess.run([_which("scancel"), "--user=root"], env=full_env, capture_output=True, timeout=30)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # munged's own --stop waits for it to shut down, and it writes its seed file into the folder
        # as it does: the folder goes after that (munged daemonized: not this process's child)
        subprocess.run([_which("munged"), "--stop", f"--socket={sock}"], capture_output=True, timeout=30)
        shutil.rmtree(d, ignore_errors=True)

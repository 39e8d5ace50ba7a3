"""Faults at named points, for tests: the store fails, a job dies or two claims race at exactly the
step a test names, so that no test has to catch a moment by polling.

One environment variable, read here only: ``BNLAB_FAULT=name[:N][@J],...`` (comma-separated for
several). ``@J`` restricts a fault to Hydra job number J (0, 1, ... as a sweep prints them);
epochs count from 1 as they are logged. Unset, every ``point()`` returns at once.

  store_readonly_after_job:J  once job J has recorded its outcome, the SQLite store becomes
                              read-only for real: the immutable flag (root, which ignores file
                              modes) or file modes, on the file and its folder; the caller undoes it
  store_full_after_job:J      once job J has recorded its outcome, fill the store's file system to
                              the last byte (file FILLER beside the store; refused where more than
                              FULL_LIMIT_BYTES are free: meant for a small tmpfs)
  pause_after_job:J           once job J has recorded its outcome, write DIR/after_job_J.reached and
                              wait for DIR/after_job_J.go (the test breaks something in between)
  kill_after_epoch:E[@J]      SIGKILL this process once epoch E's metrics are written
  sigint_after_epoch:E[@J]    SIGINT this process (Ctrl-C) once epoch E's metrics are written
  usr2_after_epoch:E[@J]      SIGUSR2 this process once epoch E's metrics and checkpoint are written:
                              the signal SLURM sends before preemption or a time limit (submitit's
                              --signal=USR2@signal_delay_s); in a SLURM task submitit's handler
                              checkpoints and requeues it (outside one, SIGUSR2 ends the process)
  fail_claim_create[@J]       the claim's create_run fails as a store error (MlflowException)
  store_busy:N                the first N store calls of this process are answered "busy" (a
                              server's exhausted connection pool) before they reach the store
  claim_race:R[@J]            over HTTP, racer R (1 or 2) of two jobs claiming one grid point: each
                              writes DIR/claim_race.<hash>.<R>.checked once its checks are done and
                              waits until both have; racer 2 then waits for DIR/claim_race.<hash>.1.done
                              (written after racer 1's conditional write) before making its own

DIR is $BNLAB_FAULT_DIR. A wait that is not answered within $BNLAB_FAULT_TIMEOUT_S (120 s) raises
FaultError: a broken test fails loudly, it never hangs. An unknown name or a malformed argument
raises FaultError too (bnlab-train reports it as bad input).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

ENV = "BNLAB_FAULT"
DIR_ENV = "BNLAB_FAULT_DIR"
TIMEOUT_ENV = "BNLAB_FAULT_TIMEOUT_S"
FILLER = ".bnlab_fault_filler"
FULL_LIMIT_BYTES = 256 * 2**20


class FaultError(RuntimeError):
    """A fault that is unknown, malformed, or whose wait was never answered."""


@dataclass(frozen=True)
class Fault:
    name: str
    arg: Optional[int]  # the job (after_job), the epoch, or the racer's rank
    job: Optional[int]  # @J: only in Hydra job J


# name -> (the points it acts at, whether it takes a number :N)
_POINT: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    "store_readonly_after_job": (("job_done",), True),
    "store_full_after_job": (("job_done",), True),
    "pause_after_job": (("job_done",), True),
    "kill_after_epoch": (("epoch_logged",), True),
    "sigint_after_epoch": (("epoch_logged",), True),
    "usr2_after_epoch": (("epoch_logged",), True),
    "fail_claim_create": (("claim_create",), False),
    "store_busy": (("store_call",), True),
    "claim_race": (("claim_race", "claim_settled"), True),
}
_cache: Tuple[str, Tuple[Fault, ...]] = ("", ())


def _parse_one(item: str) -> Fault:
    body, _, job = item.partition("@")
    name, _, arg = body.partition(":")
    if name not in _POINT:
        raise FaultError(f"{ENV}: unknown fault {name!r}; known: {', '.join(_POINT)}")
    takes_arg = _POINT[name][1]
    try:
        n = int(arg) if arg else None
        j = int(job) if job else None
    except ValueError:
        raise FaultError(f"{ENV}: {item!r}: the number after ':' or '@' must be an integer") from None
    if takes_arg and n is None:
        raise FaultError(f"{ENV}: {item!r}: {name} needs a number, e.g. {name}:1")
    if not takes_arg and n is not None:
        raise FaultError(f"{ENV}: {item!r}: {name} takes no ':N' (use @J for one job)")
    if name == "claim_race" and n not in (1, 2):
        raise FaultError(f"{ENV}: {item!r}: the racer's rank must be 1 or 2")
    return Fault(name, n, j)


def active() -> Tuple[Fault, ...]:
    """The faults set in $BNLAB_FAULT (the one place it is read), parsed once per value."""
    global _cache
    text = os.environ.get(ENV, "").strip()
    if text != _cache[0]:
        _cache = (text, tuple(_parse_one(s.strip()) for s in text.split(",") if s.strip()))
    return _cache[1]


def point(name: str, **ctx) -> None:
    """A named step of production code. Does nothing unless a fault set for it matches `ctx`
    (job: the Hydra job number or None, epoch, key, uri, flush...)."""
    if not os.environ.get(ENV):
        return
    for f in active():
        if name not in _POINT[f.name][0]:
            continue
        if f.job is not None and _int(ctx.get("job")) != f.job:
            continue
        _ACTIONS[f.name](f, name, ctx)


def _int(v) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _dir() -> Path:
    d = os.environ.get(DIR_ENV)
    if not d:
        raise FaultError(f"{ENV}: this fault signals through files: set {DIR_ENV} to a folder")
    return Path(d)


def _wait_for(path: Path, what: str) -> None:
    # Waits on an explicit signal (a file another process writes); the timeout only fails loudly.
    limit = float(os.environ.get(TIMEOUT_ENV, "120"))
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise FaultError(f"{ENV}: waited {limit:g} s for {path} ({what})")
        time.sleep(0.02)


def _touch(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(path)  # appears whole, at once


def _store_file(ctx) -> Path:
    from bnlab.store import sqlite_path

    p = sqlite_path(ctx.get("uri"))
    if p is None:
        raise FaultError(f"{ENV}: store faults need a SQLite store, got {ctx.get('uri')!r}")
    return p


# ------------------------------------------------------------------------------------- actions

def _after_job(f: Fault, ctx) -> bool:
    return _int(ctx.get("job")) == f.arg


def _readonly(f: Fault, point_name: str, ctx) -> None:
    if not _after_job(f, ctx):
        return
    db = _store_file(ctx)
    if os.geteuid() == 0:
        # Root writes through any file mode: the immutable flag stops it (SQLite can then neither
        # write the file nor create its journal beside it).
        subprocess.run(["chattr", "+i", str(db), str(db.parent)], check=True)
    else:
        db.chmod(0o444)
        db.parent.chmod(0o555)


def _full(f: Fault, point_name: str, ctx) -> None:
    if not _after_job(f, ctx):
        return
    folder = _store_file(ctx).parent
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free > FULL_LIMIT_BYTES:
        raise FaultError(f"{ENV}: store_full_after_job would write {free} bytes into {folder}; "
                         f"it fills only file systems with at most {FULL_LIMIT_BYTES} bytes free")
    with open(folder / FILLER, "wb", buffering=0) as fh:
        block = 1 << 20
        while block:
            try:
                fh.write(b"\0" * block)
            except OSError:  # ENOSPC: try smaller pieces, down to one byte
                block //= 2


def _pause(f: Fault, point_name: str, ctx) -> None:
    if not _after_job(f, ctx):
        return
    d = _dir()
    _touch(d / f"after_job_{f.arg}.reached")
    _wait_for(d / f"after_job_{f.arg}.go", "the test's go-ahead")


def _after_epoch(f: Fault, ctx) -> bool:
    if _int(ctx.get("epoch")) != f.arg:
        return False
    flush: Optional[Callable[[], None]] = ctx.get("flush")
    if flush is not None:
        flush()  # the epoch's metrics are in the store, not only queued
    return True


def _kill(f: Fault, point_name: str, ctx) -> None:
    if _after_epoch(f, ctx):
        os.kill(os.getpid(), signal.SIGKILL)


def _sigint(f: Fault, point_name: str, ctx) -> None:
    if _after_epoch(f, ctx):
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt right here


def _usr2(f: Fault, point_name: str, ctx) -> None:
    if _after_epoch(f, ctx):
        # Python runs the handler (submitit's checkpoint_and_try_requeue) right here, in this
        # thread, before the next epoch: it requeues the task and exits (SystemExit).
        os.kill(os.getpid(), signal.SIGUSR2)


def _fail_claim(f: Fault, point_name: str, ctx) -> None:
    from mlflow.exceptions import MlflowException

    raise MlflowException(f"planted fault ({ENV}=fail_claim_create): the claim could not be created")


_busy_calls = [0]


def _busy(f: Fault, point_name: str, ctx) -> None:
    from mlflow.exceptions import MlflowException

    _busy_calls[0] += 1
    if _busy_calls[0] <= f.arg:
        raise MlflowException(f"planted fault ({ENV}=store_busy:{f.arg}): QueuePool limit of size 4 overflow 2 "
                              f"reached, connection timed out, timeout 30.00 (call {_busy_calls[0]}: {ctx.get('method')})")


def _race(f: Fault, point_name: str, ctx) -> None:
    d, key, me = _dir(), ctx.get("key", "point"), f.arg
    if point_name == "claim_race":
        _touch(d / f"claim_race.{key}.{me}.checked")
        for r in (1, 2):
            _wait_for(d / f"claim_race.{key}.{r}.checked", f"racer {r}'s checks")
        if me == 2:
            _wait_for(d / f"claim_race.{key}.1.done", "racer 1's conditional write")
    else:  # claim_settled
        _touch(d / f"claim_race.{key}.{me}.done")


_ACTIONS: Dict[str, Callable[[Fault, str, dict], None]] = {
    "store_readonly_after_job": _readonly, "store_full_after_job": _full, "pause_after_job": _pause,
    "kill_after_epoch": _kill, "sigint_after_epoch": _sigint, "usr2_after_epoch": _usr2,
    "fail_claim_create": _fail_claim,
    "claim_race": _race, "store_busy": _busy,
}

"""bnlab-train processes launched together on one store (tests/test_exactly_once.py and
tests/test_http_store.py): start them, wait for them, and check that each grid point was trained once."""
from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

from conftest import BIN, runs_of


def kids(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def sweeps(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]


def start(home: Path, args, fault: str = "", fault_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1", "BNLAB_FAULT": fault}
    if fault_dir is not None:
        env["BNLAB_FAULT_DIR"] = str(fault_dir)
    return subprocess.Popen([str(BIN / "bnlab-train"), *args], cwd=str(home), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_all(procs, timeout: float = 600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def two_at_once(home: Path, args, timeout: float = 600):
    # Launched together, in whatever order the machine runs them: exactly once must hold for every
    # interleaving. The HTTP claim race is also forced both ways (bnlab.faults claim_race).
    return wait_all([start(home, args) for _ in range(2)], timeout)


def summed_summaries(outs):
    """(finished, skipped) summed over the processes' final `bnlab-train: ...` lines (one each)."""
    summaries = [ln for o in outs for ln in o.splitlines() if ln.startswith("bnlab-train: ") and " finished, " in ln]
    assert len(summaries) == len(outs), outs
    finished = sum(int(s.split("bnlab-train: ")[1].split()[0]) for s in summaries)
    skipped = sum(int(s.split(" skipped")[0].split()[-1]) for s in summaries)
    return finished, skipped


def assert_once(home, outs, n_points, uri=None, experiment="smoke"):
    """Each of the n_points grid points FINISHED once, trained by one process and skipped (and said
    so) by the other; every run finished. Returns the experiment's runs."""
    _, runs = runs_of(home, experiment, uri=uri)
    ks = kids(runs)
    fin = Counter(k.data.tags["bnlab.config_hash"] for k in ks if k.info.status == "FINISHED")
    assert len(fin) == n_points and set(fin.values()) == {1}, fin
    assert not [k for k in ks if k.info.status != "FINISHED"], [k.info.status for k in ks]
    assert summed_summaries(outs) == (n_points, n_points)
    assert sum(o.count("skipped: config") for o in outs) == n_points
    assert all(p.info.status == "FINISHED" for p in sweeps(runs))
    return runs

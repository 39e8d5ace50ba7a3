"""How many torch threads a run uses when train.threads is null: the CPUs this process may use
(affinity, cgroup CPU quota) less those that other processes keep busy right now, and worker
threads that sleep instead of spinning while they wait. train.threads, when set, wins."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

# How long the CPU counters are sampled to see what other processes use (once per run, at setup).
LOAD_SAMPLE_S = 0.3
# Below this much free CPU a core does not count as free (rounding: 0.5 of a core frees one thread).
FREE_ROUND = 0.5


def affinity_cpus() -> Set[int]:
    """The CPUs this process may run on (sched_getaffinity; every CPU where it does not exist)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quota(proc_cgroup: Path = Path("/proc/self/cgroup"),
                 root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (2.5 = 250 ms per 100 ms), the smallest along
    its path to the root; None when unlimited or unknown. cgroup v2 `cpu.max` ("max 100000" or
    "QUOTA PERIOD"), v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1 = unlimited)."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits: List[float] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            bases, files = [root], ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1 cpu controller, mounted as cpu or cpu,cpuacct
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            files = ("cpu.cfs_quota_us",)
        else:
            continue
        for base in bases:
            d = base / rel if rel else base
            while True:
                q = _quota_in(d, files[0])
                if q is not None:
                    limits.append(q)
                if d == base or base not in d.parents:
                    break
                d = d.parent
    return min(limits) if limits else None


def _quota_in(d: Path, name: str) -> Optional[float]:
    if name == "cpu.max":
        fields = (_read(d / name) or "").split()
        if not fields or fields[0] == "max":
            return None
        return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def cpu_counters(stat: Path = Path("/proc/stat")) -> Dict[int, Tuple[int, int]]:
    """Per CPU (busy, total) jiffies since boot from /proc/stat (idle and iowait count as idle)."""
    out: Dict[int, Tuple[int, int]] = {}
    text = _read(stat) or ""
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        v = [int(x) for x in vals[:8]] + [0] * max(0, 8 - len(vals))
        total = sum(v)
        out[int(name[3:])] = (total - v[3] - v[4], total)
    return out


def busy_cpus(cpus: Set[int], sample_s: float = LOAD_SAMPLE_S,
              counters: Callable[[], Dict[int, Tuple[int, int]]] = cpu_counters,
              sleep: Callable[[float], None] = time.sleep,
              own_cpu_s: Callable[[], float] = time.process_time) -> Optional[float]:
    """How many of `cpus` other processes keep busy, in CPUs, over `sample_s` seconds (this
    process's own CPU time in the window is taken out). None where /proc/stat is unreadable."""
    a, own_a = counters(), own_cpu_s()
    sleep(sample_s)
    b, own_b = counters(), own_cpu_s()
    ids = [i for i in cpus if i in a and i in b]
    if not ids:
        return None
    busy = sum(b[i][0] - a[i][0] for i in ids)
    total = sum(b[i][1] - a[i][1] for i in ids)
    if total <= 0:
        return None
    # total jiffies over the window / len(ids) = the window in jiffies; busy / that = busy CPUs.
    window = total / len(ids)
    hz = window / sample_s if sample_s > 0 else 100.0
    others = busy / window - (own_b - own_a) * hz / window
    return max(0.0, others)


@dataclass
class Choice:
    threads: int
    usable: float  # CPUs this process may use (affinity, quota)
    busy: Optional[float]  # CPUs busy with other processes (None: unknown)

    def why(self) -> str:
        busy = "unknown" if self.busy is None else f"{self.busy:.1f}"
        return (f"{self.threads} torch thread(s): {self.usable:g} CPU(s) usable (affinity, cgroup quota), "
                f"{busy} busy with other processes")


def choose(usable: float, busy: Optional[float]) -> int:
    """Threads = the free CPUs, rounded (half a free CPU counts), at least 1, at most the usable."""
    cap = max(1, int(math.floor(usable + 1e-9)))
    if busy is None:
        return cap
    free = usable - busy
    return max(1, min(cap, int(math.floor(free + FREE_ROUND))))


def auto_threads(sample_s: float = LOAD_SAMPLE_S) -> Choice:
    cpus = affinity_cpus()
    usable = float(len(cpus))
    quota = cgroup_quota()
    if quota is not None:
        usable = min(usable, quota)
    busy = busy_cpus(cpus, sample_s)
    return Choice(choose(usable, busy), usable, busy)


def quiet_waits() -> bool:
    """Idle OpenMP workers sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user set
    a policy. libgomp reads it once, when torch loads it: True if set in time (torch not yet
    imported), False if torch was already loaded."""
    if "OMP_WAIT_POLICY" in os.environ:
        return "torch" not in sys.modules
    if "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

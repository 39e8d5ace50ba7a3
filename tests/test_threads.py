"""bnlab.threads: the thread count from faked affinity, cgroup quotas and CPU counters."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bnlab import threads as th


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("usable,busy,want", [
    (2, 0.0, 2), (2, None, 2), (2, 1.0, 1), (2, 0.9, 1), (2, 0.4, 2), (2, 2.0, 1), (2, 3.5, 1),
    (8, 2.2, 6), (8, 2.6, 5), (1.5, 0.0, 1), (2.5, 0.0, 2), (0.5, 0.0, 1), (16, 0.0, 16),
])
def test_choose(usable, busy, want):
    assert th.choose(usable, busy) == want


def test_cgroup_v2_quota_smallest_on_the_path(tmp_path):
    pc = tmp_path / "proc_cgroup"
    write(pc, "0::/user.slice/job42\n")
    root = tmp_path / "cg"
    write(root / "user.slice" / "job42" / "cpu.max", "150000 100000\n")
    write(root / "user.slice" / "cpu.max", "400000 100000\n")
    write(root / "cpu.max", "max 100000\n")
    assert th.cgroup_quota(pc, root) == pytest.approx(1.5)
    write(root / "user.slice" / "job42" / "cpu.max", "max 100000\n")
    assert th.cgroup_quota(pc, root) == pytest.approx(4.0)
    write(root / "user.slice" / "cpu.max", "max 100000\n")
    assert th.cgroup_quota(pc, root) is None


def test_cgroup_v1_quota(tmp_path):
    pc = tmp_path / "proc_cgroup"
    write(pc, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert th.cgroup_quota(pc, root) == pytest.approx(0.5)
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert th.cgroup_quota(pc, root) is None


def test_no_cgroup_files(tmp_path):
    assert th.cgroup_quota(tmp_path / "missing", tmp_path) is None


def test_cpu_counters_parse(tmp_path):
    stat = tmp_path / "stat"
    write(stat, "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 1 2 3 40 4 1 1 1 0 0\n"
                "intr 1 2 3\n")
    c = th.cpu_counters(stat)
    assert c == {0: (10, 50), 1: (9, 53)}


def fake_counters(samples):
    it = iter(samples)
    return lambda: next(it)


def test_busy_cpus_counts_only_allowed_cpus_and_not_itself():
    # 4 CPUs, 100 jiffies each over the window; CPU 0 fully busy, CPU 1 half, CPUs 2-3 (not ours) busy.
    a = {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)}
    b = {0: (100, 100), 1: (50, 100), 2: (100, 100), 3: (100, 100)}
    own = iter([0.0, 0.0])
    busy = th.busy_cpus({0, 1}, 1.0, fake_counters([a, b]), sleep=lambda s: None, own_cpu_s=lambda: next(own))
    assert busy == pytest.approx(1.5)
    # This process used 0.5 CPU-seconds of the 1 s window (100 jiffies/s): 0.5 CPUs are its own.
    own = iter([2.0, 2.5])
    busy = th.busy_cpus({0, 1}, 1.0, fake_counters([a, b]), sleep=lambda s: None, own_cpu_s=lambda: next(own))
    assert busy == pytest.approx(1.0)


def test_busy_cpus_unknown_without_counters():
    assert th.busy_cpus({0}, 0.0, lambda: {}, sleep=lambda s: None) is None


def test_auto_threads_from_faked_machine(monkeypatch):
    monkeypatch.setattr(th, "affinity_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(th, "cgroup_quota", lambda: 3.0)
    monkeypatch.setattr(th, "busy_cpus", lambda cpus, s: 1.0)
    c = th.auto_threads()
    assert (c.threads, c.usable, c.busy) == (2, 3.0, 1.0)
    assert "2 torch thread(s)" in c.why()
    monkeypatch.setattr(th, "cgroup_quota", lambda: None)
    monkeypatch.setattr(th, "busy_cpus", lambda cpus, s: None)
    assert th.auto_threads().threads == 4


def test_busy_cpus_sees_a_competing_process():
    # A real CPU-bound child on this machine: the measured load includes it (at least 0.5 CPU).
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.write('go\\n'); sys.stdout.flush()\n"
                              "while True: pass"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "go\n"
        busy = th.busy_cpus(th.affinity_cpus(), 0.5)
        assert busy is not None and busy >= 0.5
    finally:
        child.kill()
        child.wait()


def test_explicit_threads_win(monkeypatch):
    import torch

    from bnlab import train

    monkeypatch.setattr(train, "auto_threads", lambda: pytest.fail("train.threads=1 must not measure"))
    before = torch.get_num_threads()
    try:
        assert train.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(train, "auto_threads", lambda: th.Choice(2, 2.0, 0.0))
        assert train.set_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_passive_wait_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, bnlab, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"

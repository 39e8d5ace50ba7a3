"""bnlab.slurm.wait_bounded with fake jobs, queue and clock: a task that left the queue without a
result is declared dead after the grace period, never before; finished ones never. And a task's
requeue that SLURM's own SIGTERM interrupts (a fake scontrol)."""
from __future__ import annotations

import os

import pytest

from bnlab.slurm import wait_bounded


class FakeJob:
    def __init__(self, job_id, done_at=None):
        self.job_id, self.done_at, self.now = job_id, done_at, 0.0

    def done(self):
        return self.done_at is not None and self.now >= self.done_at


def run(jobs, in_queue_until, grace, squeue_down=False):
    t = {"now": 0.0}

    def clock():
        for j in jobs:
            j.now = t["now"]
        return t["now"]

    def queue(ids):
        clock()
        if squeue_down:
            return None if t["now"] < 50 else set()
        return {i for i in ids if t["now"] < in_queue_until[i]}

    def sleep(s):
        t["now"] += s

    dead = wait_bounded(jobs, grace, poll_s=1.0, queue=queue, clock=clock, sleep=sleep)
    return dead, t["now"]


def test_dead_after_grace_finished_kept():
    jobs = [FakeJob("7_0", done_at=5), FakeJob("7_1"), FakeJob("7_2", done_at=12)]
    # 7_1 leaves the queue at t=3 without a result; 7_2 leaves at 10 and its result shows at 12
    dead, end = run(jobs, {"7_0": 5, "7_1": 3, "7_2": 10}, grace=4)
    assert dead == [1]
    assert 7 <= end <= 13


def test_unknown_queue_presumes_nothing():
    jobs = [FakeJob("8_0")]
    dead, end = run(jobs, {"8_0": 0}, grace=3, squeue_down=True)
    assert dead == [0] and end >= 53  # only counted once squeue answers again


@pytest.mark.parametrize("scontrol, raises", [("kill -TERM $$", False), ("exit 1", True)])
def test_a_scontrol_requeue_ended_by_the_requeues_own_sigterm_is_a_requeue(tmp_path, monkeypatch, scontrol, raises):
    """SLURM's requeue signals every process of the task, the `scontrol requeue` that submitit runs
    included: a scontrol ended by SIGTERM is the requeue under way, any other failure still raises.
    The fault is a scontrol on PATH that does exactly that."""
    import subprocess

    from submitit.slurm.slurm import SlurmJobEnvironment

    from bnlab import slurm

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n{scontrol}\n')
    (bin_ / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", SlurmJobEnvironment._requeue)  # restored after
    slurm.requeue_survives_its_own_signal()
    slurm.requeue_survives_its_own_signal()  # once is enough; twice wraps nothing twice
    env = SlurmJobEnvironment()
    if raises:
        with pytest.raises(subprocess.CalledProcessError):
            env._requeue(1)
    else:
        env._requeue(1)
    assert (tmp_path / "args").read_text().split() == ["requeue", "42"]

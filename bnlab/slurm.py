"""hydra/launcher=slurm: Hydra's submitit SLURM launcher (the class, which Hydra only accepts from
the hydra_plugins package, is hydra_plugins.bnlab_launcher.SlurmLauncher), except that the sweep waits for its array
tasks with a bound. Without SLURM accounting (no slurmdbd, so no sacct) submitit never learns
that a task died without writing its result (SIGKILL, scancel, a lost node) and waits forever;
here a task that has left the queue (squeue) for BNLAB_SLURM_GRACE_S seconds without a result
counts as failed, its RUNNING run is ended KILLED, and the sweep goes on to its count and exit 1.
Preemption and time limits keep submitit's checkpoint/requeue (max_num_timeout): the requeued task
resumes its run from the last complete epoch (bnlab.sweep, bnlab.checkpoint); it stays in the queue
meanwhile (pending for SLURM's cred_expire, 120 s by default), so the bounded wait never counts it."""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Set

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

log = logging.getLogger("bnlab")
# A task gone from the queue may still be writing its result (a shared file system shows it
# later): this long without one, it is presumed dead.
GRACE_S = 30.0
POLL_S = 2.0


def requeue_survives_its_own_signal() -> None:
    """In a SLURM task: submitit requeues a preempted or timed-out task with `scontrol requeue`, run
    from inside the task, and SLURM's requeue then signals every process of the task, that scontrol
    included. Where the SIGTERM comes before scontrol has read slurmctld's answer (seen under load),
    submitit raised CalledProcessError and the requeued task's run was counted failed, although
    SLURM requeued it. A scontrol ended by SIGTERM is taken as the requeue under way: submitit then
    exits as after any requeue, without a result. Should the job not be requeued after all (it was
    cancelled meanwhile), the sweep's bounded wait counts it failed. Any other scontrol failure
    still raises. Idempotent."""
    import signal

    from submitit.slurm.slurm import SlurmJobEnvironment

    original = SlurmJobEnvironment._requeue
    if getattr(original, "_bnlab", False):
        return

    def _requeue(self, countdown: int) -> None:
        try:
            original(self, countdown)
        except subprocess.CalledProcessError as e:
            if e.returncode != -signal.SIGTERM:
                raise
            log.warning("scontrol requeue %s ended by SIGTERM, as SLURM's requeue signals the whole task: "
                        "exiting for the requeued attempt", self.job_id)

    _requeue._bnlab = True  # type: ignore[attr-defined]
    SlurmJobEnvironment._requeue = _requeue


def grace_s() -> float:
    return float(os.environ.get("BNLAB_SLURM_GRACE_S", GRACE_S))


def queued(job_ids: Sequence[str]) -> Optional[Set[str]]:
    """The ids ("123_4" for array tasks) of those jobs that SLURM still has pending or running;
    None when squeue does not answer (then nothing is presumed dead)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        # squeue exits 1 for job ids it no longer knows (all finished): an empty queue, not an error
        return set() if "Invalid job id" in r.stderr else None
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}


def wait_bounded(jobs: List[Any], grace: float, poll_s: float = POLL_S,
                 queue=queued, clock=time.monotonic, sleep=time.sleep) -> List[Optional[int]]:
    """Wait until every job has a result or has been out of the queue for `grace` seconds without
    one. Returns the indexes of the dead jobs (in order)."""
    pending = set(range(len(jobs)))
    gone_since: dict = {}
    dead: List[int] = []
    while pending:
        in_queue = queue([jobs[i].job_id for i in pending])
        now = clock()
        for i in sorted(pending):
            if jobs[i].done():
                pending.discard(i)
                continue
            if in_queue is None or jobs[i].job_id in in_queue:
                gone_since.pop(i, None)
                continue
            gone_since.setdefault(i, now)
            if now - gone_since[i] >= grace:
                dead.append(i)
                pending.discard(i)
        if pending:
            sleep(poll_s)
    return dead


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """SlurmLauncher.launch: as Hydra's BaseSubmititLauncher.launch (hydra-submitit-launcher 1.2)
    builds and submits the array, then waits with wait_bounded instead of job.results()."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert launcher.config is not None
    ex, params = launcher._EXECUTOR, launcher.params
    init_keys = {"max_num_timeout", "submitit_folder"}
    extra = {f"{ex}_max_num_timeout": params["max_num_timeout"]} if "max_num_timeout" in params else {}
    executor = submitit.AutoExecutor(cluster=ex, folder=params["submitit_folder"], **extra)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in baseparams else f"{ex}_{k}": v
                                  for k, v in params.items() if k not in init_keys})
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    job_params = []
    for idx, overrides in enumerate(job_overrides):
        idx = initial_job_idx + idx
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*job_params))
    log.info("SLURM array %s: %d task(s)", jobs[0].job_id.split("_")[0] if jobs else "-", len(jobs))
    dead = set(wait_bounded(jobs, grace_s()))
    return [dead_task(launcher.config, job, job_params[i][2], list(job_overrides[i])) if i in dead
            else job.results()[0] for i, job in enumerate(jobs)]


def dead_task(config, job, num: int, overrides: List[str]) -> JobReturn:
    """A task that left the queue without a result: a failed outcome for the sweep's count,
    and its run (RUNNING, tagged with the task id) ended KILLED so a relaunch resumes it."""
    from bnlab import outcomes
    from bnlab.store import TAG, client

    why = f"SLURM task {job.job_id} ended without a result (killed, cancelled or its node lost)"
    log.error("job %d: %s", num, why)
    sdir = config.hydra.sweep.dir
    if not any(o["job"] == num for o in outcomes.read_outcomes(sdir)):
        outcomes.record_outcome(sdir, num, "failed", why)
    uri, exp = config.tracking.uri, config.tracking.experiment
    try:
        c = client(uri)
        e = c.get_experiment_by_name(exp)
        runs = c.search_runs([e.experiment_id], max_results=100, filter_string=(
            f"tags.`{TAG}slurm_task` = '{job.job_id}' and attributes.status = 'RUNNING'")) if e else []
        for r in runs:
            c.set_tag(r.info.run_id, TAG + "error", why)
            c.set_terminated(r.info.run_id, status="KILLED")
    except Exception as e:  # noqa: BLE001 - the count above already says the task failed
        log.warning("could not mark the run of SLURM task %s KILLED: %s", job.job_id, e)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value={"failed": 1.0})

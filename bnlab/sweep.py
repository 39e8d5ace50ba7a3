"""Sweeps: the Hydra callback that prepares the store and the parent run before any job starts and
counts the outcomes after the last; each job's claim on its grid point (config hash + heartbeat),
resume, dead- and stale-claim clean-up, and the outcome it records.

A claim is settled under a file lock on a SQLite store. Over HTTP there is no shared lock, so the
claim is a conditional write the server makes atomic: creating an experiment whose name is the slot
"bnlab.claim/<experiment id>/<config hash>/<generation>" (MLflow refuses a second experiment of one
name, deleted ones included, with RESOURCE_ALREADY_EXISTS: a UNIQUE constraint in its database). The
job that creates slot g owns the grid point; every other gets the refusal and skips. A slot is
deleted right after it is created, so the UI never lists it; it still reserves its name. Slot g+1 may
be taken only once slot g's holder is gone (its run KILLED, FAILED or deleted, or no run and its
process dead or silent for the claim timeout), so a dead claimant's grid point is taken over exactly
once, whatever the timing. Chosen over a param written to a shared run (params are immutable too)
because a slot needs no object that exists beforehand: a shared run would itself have to be created
exactly once. `mlflow gc` removes slots; a live claim is then still seen through its RUNNING run."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from hydra.experimental.callback import Callback

from bnlab import checkpoint, describe, faults
from bnlab.outcomes import SweepResult, summarise
from bnlab.config import Config, flatten
from bnlab.roles import config_hash
from bnlab.store import (TAG, client, ensure_experiment, git_info, is_http, owner_tags, pid_alive, resolve_uri,
                         root_cause, store_lock)
from bnlab.tracking import MlflowTracker

log = logging.getLogger("bnlab")
PARENT_FILE = ".bnlab_parent_run"
VARYING_FILE = ".bnlab_varying_keys"  # JSON list: what run names show
# A RUNNING run whose heartbeat (refreshed at its claim, its start and every epoch) is older than
# this is presumed dead (a crashed node, a lost process on another host) and may be taken over.
# It must exceed the longest epoch; BNLAB_CLAIM_TIMEOUT_S overrides it.
CLAIM_TIMEOUT_S = 1800.0
SLOT_PREFIX = "bnlab.claim"  # HTTP claim slots: experiment names (see the module docstring)


def claim_timeout_s() -> float:
    return float(os.environ.get("BNLAB_CLAIM_TIMEOUT_S", CLAIM_TIMEOUT_S))


def run_name(overrides: List[str], varying: Optional[List[str]] = None) -> str:
    """A readable run name (MLflow's random names say nothing); the scheme is bnlab.describe.run_name."""
    return describe.run_name(overrides, varying)


def sweep_grid(config) -> Dict[str, List[str]]:
    """Every key of a multirun and its values: the study's hydra.sweeper.params, then the command
    line (which wins), combined as Hydra's basic sweeper and bnlab.cli.expand_jobs do."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    study = config.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in study.items()] + list(config.hydra.overrides.task)
    grid: Dict[str, List[str]] = {}
    for p in OverridesParser.create().parse_overrides(lines):
        key = p.get_key_element().lstrip("+~")
        if not key.startswith("hydra"):
            grid[key] = list(p.sweep_string_iterator()) if p.is_sweep_override() else [p.get_value_element_as_str()]
    return grid


def sweep_varying(hc) -> Optional[List[str]]:
    """The keys this job's sweep varies, as the sweep callback recorded them (None if unknown)."""
    # The environment first (two sweeps may share one sweep folder), then the sweep folder's file.
    f = Path(hc.sweep.dir) / VARYING_FILE
    text = os.environ.get("BNLAB_VARYING") or (f.read_text() if f.is_file() else None)
    return json.loads(text) if text else None


def sweep_key(cfg_experiment: str, overrides: List[str]) -> str:
    """Identity of a sweep: relaunching the same command reuses its parent run."""
    blob = cfg_experiment + "|" + "|".join(sorted(o for o in overrides if not o.startswith("hydra")))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def mark_dead_runs(uri: Optional[str], experiment: str, extra_filter: str = "") -> int:
    """Runs left RUNNING by a process of this host that no longer exists (SIGKILL, power loss)
    are ended KILLED, so a relaunch never leaves a run RUNNING forever. Returns how many."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    host = socket.gethostname()
    flt = "attributes.status = 'RUNNING'" + (f" and {extra_filter}" if extra_filter else "")
    n = 0
    for r in c.search_runs([exp.experiment_id], filter_string=flt, max_results=5000):
        tags = r.data.tags
        pid = tags.get(TAG + "pid")
        if tags.get(TAG + "host") == host and pid and int(pid) != os.getpid() and not pid_alive(int(pid)):
            c.set_tag(r.info.run_id, TAG + "error", f"process {pid} died; marked KILLED on relaunch")
            c.set_terminated(r.info.run_id, status="KILLED")
            n += 1
    return n


def finished_run(uri: Optional[str], experiment: str, h: str) -> Optional[str]:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], max_results=1,
                         filter_string=f"tags.`{TAG}config_hash` = '{h}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def _beat(run) -> float:
    """Last sign of life of a run, in seconds: its heartbeat tag, else its start (older stores)."""
    hb = run.data.tags.get(TAG + "heartbeat")
    try:
        return float(hb) if hb else run.info.start_time / 1000.0
    except ValueError:
        return run.info.start_time / 1000.0


def claims(uri: Optional[str], experiment: str, h: str) -> list:
    """RUNNING job runs of this config hash, oldest claim first."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], max_results=1000,
                         filter_string=f"tags.`{TAG}config_hash` = '{h}' and attributes.status = 'RUNNING'")
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def expire_stale_claims(uri: Optional[str], experiment: str, h: str) -> int:
    """RUNNING runs of this grid point with no heartbeat for claim_timeout_s() end KILLED."""
    c, now, n = client(uri), time.time(), 0
    for r in claims(uri, experiment, h):
        age = now - _beat(r)
        if age > claim_timeout_s():
            c.set_tag(r.info.run_id, TAG + "error",
                      f"no heartbeat for {age:.0f} s (timeout {claim_timeout_s():.0f} s); claim taken over, "
                      f"marked KILLED by {socket.gethostname()} pid {os.getpid()}")
            c.set_terminated(r.info.run_id, status="KILLED")
            n += 1
    return n


def interrupted_run(uri: Optional[str], experiment: str, h: str) -> Optional[str]:
    """The latest KILLED run of this grid point (SIGKILL, preemption, a time limit, Ctrl-C) with a
    checkpoint: a relaunch takes it over and resumes it from its last complete epoch."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], max_results=100, order_by=["attributes.start_time DESC"],
                         filter_string=f"tags.`{TAG}config_hash` = '{h}' and attributes.status = 'KILLED'")
    # Only a run with a complete epoch has something to resume; one killed earlier stays KILLED.
    return next((r.info.run_id for r in runs if checkpoint.last_epoch(r.data.tags) is not None), None)


def slurm_task() -> Optional[str]:
    """This SLURM task's identity, the same across requeues (array job + task, else the job id)."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"{job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def end_requeued_claims(uri: Optional[str], experiment: str, h: str) -> int:
    """A claim left RUNNING by an earlier attempt of this very SLURM task (preempted or timed out,
    then requeued by submitit) is ended KILLED at once, so that this attempt resumes it."""
    me = slurm_task()
    if not me:
        return 0
    c, n = client(uri), 0
    for r in claims(uri, experiment, h):
        if r.data.tags.get(TAG + "slurm_task") == me:
            c.set_tag(r.info.run_id, TAG + "error", f"SLURM task {me} requeued; resumed by its next attempt")
            c.set_terminated(r.info.run_id, status="KILLED")
            n += 1
    return n


def _owner(run) -> str:
    t = run.data.tags
    return f"run {run.info.run_id} (host {t.get(TAG + 'host', '?')}, pid {t.get(TAG + 'pid', '?')})"


def threads_for_launcher(hc) -> Optional[int]:
    """Parallel local launchers share the cores: give each job cores / n_jobs torch threads."""
    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    n_jobs = launcher.get("n_jobs") or launcher.get("tasks_per_node")
    if "joblib" in target and n_jobs and int(n_jobs) > 0:
        return max(1, (os.cpu_count() or 1) // int(n_jobs))
    return None


@dataclass
class JobContext:
    tracker: Optional[MlflowTracker]
    tags: Dict[str, str] = field(default_factory=dict)
    skip_reason: str = ""
    parent_run_id: Optional[str] = None
    uri: Optional[str] = None


def _parent_id(hc) -> Optional[str]:
    # The launching process's environment first: several sweeps may share one hydra.sweep.dir
    # (and its file), but each launcher passes its own parent to the workers it starts.
    env = os.environ.get("BNLAB_PARENT_RUN")
    if env:
        return env
    f = Path(hc.sweep.dir) / PARENT_FILE
    if f.is_file():
        return f.read_text().strip() or None
    return None


def _slot_name(exp_id: str, h: str, gen: int) -> str:
    return f"{SLOT_PREFIX}/{exp_id}/{h}/{gen}"


def _slots(c, exp_id: str, h: str) -> List[tuple]:
    """(generation, slot experiment) of this grid point, oldest first."""
    from mlflow.entities import ViewType

    prefix = _slot_name(exp_id, h, 0)[:-1]
    found = c.search_experiments(view_type=ViewType.ALL, filter_string=f"name LIKE '{prefix}%'")
    out = []
    for e in found:
        rest = e.name[len(prefix):]
        if e.name.startswith(prefix) and rest.isdigit():
            out.append((int(rest), e))
            if e.lifecycle_stage == "active":  # not hidden yet (or its creator died before it could)
                _hide(c, e.experiment_id)
    return sorted(out, key=lambda ge: ge[0])


def _hide(c, slot_id: str) -> None:
    """Delete a slot (out of the UI; its name stays reserved). Another job may have done it first."""
    from mlflow.exceptions import MlflowException

    try:
        c.delete_experiment(slot_id)
    except MlflowException:
        if c.get_experiment(slot_id).lifecycle_stage != "deleted":
            raise


def _slot_holder(c, exp_id: str, h: str, slot, resume: bool) -> Optional[str]:
    """Why slot `slot`'s holder still owns the grid point, or None if the next slot may be taken."""
    from mlflow.entities import ViewType

    t = slot.tags
    who = f"host {t.get(TAG + 'host', '?')}, pid {t.get(TAG + 'pid', '?')}"
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TAG}claim_slot` = '{slot.name}'",
                         run_view_type=ViewType.ALL, max_results=10)
    if runs:
        r = runs[0]
        if r.info.lifecycle_stage != "active" or r.info.status in ("KILLED", "FAILED"):
            return None
        if r.info.status == "FINISHED":
            return f"config {h} already has FINISHED run {r.info.run_id}" if resume else None
        if time.time() - _beat(r) > claim_timeout_s():
            return None
        return f"config {h} is being trained by {_owner(r)}"
    # The holder has not created its run yet, or died before it did.
    pid, host = t.get(TAG + "pid"), t.get(TAG + "host")
    if host == socket.gethostname() and pid and not pid_alive(int(pid)):
        return None
    if time.time() - slot.creation_time / 1000.0 > claim_timeout_s():
        return None
    return f"config {h} is being claimed by {who} (slot {slot.name})"


def take_http_slot(uri: Optional[str], exp: str, h: str, resume: bool, job=None) -> tuple:
    """Over HTTP: (slot name, None) if this job now owns grid point `h`, else (None, why it skips).
    The conditional write is create_experiment of the next free slot (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp_id = c.get_experiment_by_name(exp).experiment_id
    slots = _slots(c, exp_id, h)
    gen = 0
    if slots:
        last_gen, last = slots[-1]
        why = _slot_holder(c, exp_id, h, last, resume)
        if why:
            return None, why
        gen = last_gen + 1
    name = _slot_name(exp_id, h, gen)
    mine = {TAG + "config_hash": h, TAG + "claim_token": uuid.uuid4().hex, **owner_tags()}
    faults.point("claim_race", key=h, job=job)
    try:
        slot_id = c.create_experiment(name, tags=mine)
    except MlflowException:
        # Refused (another job holds the slot), or our own request succeeded and its retry was
        # refused: the slot's token says which.
        slot = c.get_experiment_by_name(name)
        if slot is None:
            raise
        if slot.tags.get(TAG + "claim_token") != mine[TAG + "claim_token"]:
            faults.point("claim_settled", key=h, job=job)
            t = slot.tags
            return None, (f"config {h} is being trained by host {t.get(TAG + 'host', '?')}, pid "
                          f"{t.get(TAG + 'pid', '?')} (it took slot {name} first)")
        slot_id = slot.experiment_id
    faults.point("claim_settled", key=h, job=job)
    _hide(c, slot_id)
    return name, None


def job_context(cfg: Config, hc, overrides: List[str], multirun: bool) -> JobContext:
    """The job's tracker. In a sweep the job claims its grid point first: under the store lock it
    ends dead and stale claims, skips a config hash that has a FINISHED run (resume) or a live
    claim, else creates its own RUNNING run (the claim) before anything trains."""
    uri, exp = cfg.tracking.uri, cfg.tracking.experiment
    h = config_hash(cfg)
    if not multirun:
        ensure_experiment(uri, exp)
    tags = {TAG + "overrides": " ".join(overrides) or "(none)", TAG + "role": "job", **git_info()}
    if cfg.tracking.study:
        tags[TAG + "study"] = cfg.tracking.study
    parent = None
    if multirun:
        parent = _parent_id(hc)
        tags[TAG + "job"] = str(hc.job.num)
        tags[TAG + "sweep_dir"] = str(hc.sweep.dir)
        if parent:
            tags[TAG + "sweep_id"] = parent
    tracker = MlflowTracker(uri, exp, run_name(overrides, sweep_varying(hc) if multirun else None),
                            parent_run_id=parent)
    with store_lock(uri):
        mark_dead_runs(uri, exp, f"tags.`{TAG}config_hash` = '{h}'")
        if not multirun:
            return JobContext(tracker, tags=tags, uri=uri)  # a single run is always trained
        expire_stale_claims(uri, exp, h)
        end_requeued_claims(uri, exp, h)
        # Claims first, then FINISHED runs: a claim that ends between the two queries (its owner
        # does not take the lock to finish) is then seen as FINISHED, never missed by both.
        live = claims(uri, exp, h)
        if live:
            return JobContext(None, skip_reason=f"config {h} is being trained by {_owner(live[0])}")
        done = finished_run(uri, exp, h) if cfg.tracking.resume else None
        if done:
            # The hash holds execution fields at their default (bnlab.roles.ROLES): a relaunch that
            # changes only how the job runs lands here too.
            return JobContext(None, skip_reason=f"config {h} already has FINISHED run {done} (execution "
                              f"fields such as train.device do not retrain it; tracking.resume=false does)")
        if slurm_task():
            tags[TAG + "slurm_task"] = slurm_task()
        claim = {**tags, TAG + "config_hash": h}
        if is_http(uri):
            # One conditional write decides who owns the grid point, a new claim or a take-over alike.
            slot, lost = take_http_slot(uri, exp, h, cfg.tracking.resume, job=hc.job.num)
            if lost:
                return JobContext(None, skip_reason=lost)
            claim[TAG + "claim_slot"] = slot
        killed = interrupted_run(uri, exp, h) if cfg.tracking.resume else None
        if killed:
            tracker.take_over(killed, claim)
            log.info("resuming interrupted run %s", killed)
        else:
            tracker.claim(claim)
    return JobContext(tracker, tags=tags, parent_run_id=parent, uri=uri)


LAST_RESULT: Optional[SweepResult] = None  # read by cli.train_main for the exit status


def interrupted(ctx: JobContext) -> None:
    """Ctrl-C in a sweep: the job run is KILLED by train(), or here when Ctrl-C came between its
    claim and the start of training; end the parent run KILLED too."""
    try:
        c = client(ctx.uri)
        run_id = ctx.tracker.run_id if ctx.tracker is not None else None
        if run_id and c.get_run(run_id).info.status == "RUNNING":
            c.set_tag(run_id, TAG + "error", "interrupted (Ctrl-C)")
            c.set_terminated(run_id, status="KILLED")
        if ctx.parent_run_id:
            c.set_terminated(ctx.parent_run_id, status="KILLED")
    except Exception as e:  # the store may be unreachable; the next relaunch cleans up
        log.warning("could not mark the interrupted runs KILLED: %s", e)


def _flat_config(config) -> Dict[str, object]:
    """The multirun's composed config without its hydra node, flat (sweep values not applied)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    return flatten(OmegaConf.to_container(plain, resolve=True, enum_to_str=True))


def _log_params(c, run_id: str, params: Dict[str, object]) -> None:
    from mlflow.entities import Param

    ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(ps), 100):
        c.log_batch(run_id, params=ps[i:i + 100])


class SweepCallback(Callback):
    """Runs in the launching process, before and after all jobs of a multirun."""

    def on_multirun_start(self, config, **kwargs) -> None:
        # Hydra turns a callback's exception into a warning and runs the jobs anyway: without
        # their parent run, counts or summary. A sweep that cannot be set up stops here, loudly.
        try:
            self._start(config)
        except Exception as e:
            print(f"bnlab-train: error: could not set up the sweep in {resolve_uri(config.tracking.uri)} "
                  f"({root_cause(e)}); no job was run", file=sys.stderr, flush=True)
            sys.exit(1)

    def _start(self, config) -> None:
        from mlflow.entities import RunStatus

        global LAST_RESULT
        LAST_RESULT = None
        uri, exp = config.tracking.uri, config.tracking.experiment
        exp_id = ensure_experiment(uri, exp)  # create store + experiment once, under the store lock
        overrides = list(config.hydra.overrides.task)
        grid = sweep_grid(config)
        varying = [k for k, v in grid.items() if len(v) > 1]
        n_runs = math.prod(len(v) for v in grid.values())
        study = config.tracking.study or exp
        key = sweep_key(exp, overrides)
        tags = {TAG + "role": "sweep", TAG + "sweep_key": key, TAG + "host": socket.gethostname(),
                TAG + "pid": str(os.getpid()), TAG + "overrides": " ".join(overrides) or "(none)"}
        if config.tracking.study:
            tags[TAG + "study"] = config.tracking.study
        c = client(uri)
        have = c.get_experiment(exp_id).tags
        for k, v in describe.experiment_tags(config.tracking.study, n_runs, varying).items():
            if have.get(k) != v:  # two sweeps at once write each tag once at most
                c.set_experiment_tag(exp_id, k, v)
        with store_lock(uri):
            killed = mark_dead_runs(uri, exp)
            if killed:
                log.info("marked %d run(s) of dead processes KILLED", killed)
            # A relaunch reuses the parent row of the same command, unless a live process still
            # runs it: two sweeps at once each keep their own parent (and their own counts).
            found = c.search_runs([exp_id], max_results=1, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`{TAG}sweep_key` = '{key}' and tags.`{TAG}role` = 'sweep' "
                                                f"and attributes.status != 'RUNNING'")
            if found:
                run_id = found[0].info.run_id
                c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                for k, v in tags.items():
                    c.set_tag(run_id, k, v)
            else:
                note = describe.sweep_description(study, n_runs, varying, overrides)
                run_id = c.create_run(exp_id, run_name=describe.parent_name(study), tags={
                    **tags, **describe.standard_tags(describe.source_name(config.tracking.study)),
                    "mlflow.note.content": note}).info.run_id
                _log_params(c, run_id, describe.fixed_params(_flat_config(config), varying))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(run_id)
        os.environ["BNLAB_PARENT_RUN"] = run_id
        (sweep_dir / VARYING_FILE).write_text(json.dumps(varying))
        os.environ["BNLAB_VARYING"] = json.dumps(varying)
        os.environ["BNLAB_SWEEP_TOKEN"] = f"{run_id}-{uuid.uuid4().hex[:8]}"
        self.parent, self.uri, self.sweep_dir = run_id, uri, sweep_dir

    def on_multirun_end(self, config, **kwargs) -> None:
        global LAST_RESULT
        if not getattr(self, "parent", None):
            return
        n = os.environ.get("BNLAB_N_JOBS")
        result = summarise(self.sweep_dir, int(n) if n else None)
        result.parent_run_id = self.parent
        LAST_RESULT = result
        status = "FAILED" if result.failed else "FINISHED"
        try:
            c = client(self.uri)
            for k in ("finished", "failed", "skipped", "diverged", "not_run"):
                v = result.counts[k] + (result.counts["store_failed"] if k == "failed" else 0)
                c.set_tag(self.parent, f"{TAG}jobs_{k}", str(v))
            c.set_tag(self.parent, TAG + "summary", result.line()[:5000])
            c.set_terminated(self.parent, status=status)
        except Exception as e:  # the store may be the very thing that failed: say so, do not hide it
            print(f"bnlab-train: could not record the sweep's counts and status {status} on parent run "
                  f"{self.parent}: {root_cause(e)}", flush=True)
        print(f"bnlab-train: {result.line()} (parent run {self.parent} {status} in {resolve_uri(self.uri)})",
              flush=True)

"""Sweeps: the Hydra callback that prepares the store and the parent run before any job starts,
and each job's MLflow context (parent run, tags, resume by config hash, dead-run clean-up)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from hydra.experimental.callback import Callback

from bnlab import describe
from bnlab.config import Config, config_hash, flatten
from bnlab.tracking import TAG, MlflowTracker, client, ensure_experiment, git_info, pid_alive, resolve_uri

log = logging.getLogger("bnlab")
PARENT_FILE = ".bnlab_parent_run"
VARYING_FILE = ".bnlab_varying_keys"  # JSON list: what run names show


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
    f = Path(hc.sweep.dir) / VARYING_FILE
    text = f.read_text() if f.is_file() else os.environ.get("BNLAB_VARYING")
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
    f = Path(hc.sweep.dir) / PARENT_FILE
    if f.is_file():
        return f.read_text().strip() or None
    return os.environ.get("BNLAB_PARENT_RUN")


def job_context(cfg: Config, hc, overrides: List[str], multirun: bool) -> JobContext:
    uri, exp = cfg.tracking.uri, cfg.tracking.experiment
    h = config_hash(cfg)
    if not multirun:
        ensure_experiment(uri, exp)  # one process: no race on a fresh store
    mark_dead_runs(uri, exp, f"tags.`{TAG}config_hash` = '{h}'")
    if cfg.tracking.resume and multirun:
        done = finished_run(uri, exp, h)
        if done:
            return JobContext(None, skip_reason=f"config {h} already has FINISHED run {done}")
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
    return JobContext(tracker, tags=tags, parent_run_id=parent, uri=uri)


def interrupted(ctx: JobContext) -> None:
    """Ctrl-C in a sweep: the job run is already KILLED (train); end the parent run KILLED too."""
    if ctx.parent_run_id:
        try:
            client(ctx.uri).set_terminated(ctx.parent_run_id, status="KILLED")
        except Exception as e:  # the store may be unreachable; the next relaunch cleans up
            log.warning("could not mark the sweep's parent run KILLED: %s", e)


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
        from mlflow.entities import RunStatus

        uri, exp = config.tracking.uri, config.tracking.experiment
        exp_id = ensure_experiment(uri, exp)  # create store + experiment once: no migration race
        killed = mark_dead_runs(uri, exp)
        if killed:
            log.info("marked %d run(s) of dead processes KILLED", killed)
        overrides = list(config.hydra.overrides.task)
        grid = sweep_grid(config)
        varying = [k for k, v in grid.items() if len(v) > 1]
        n_runs = math.prod(len(v) for v in grid.values())
        study = config.tracking.study or exp
        key = sweep_key(exp, overrides)
        c = client(uri)
        for k, v in describe.experiment_tags(config.tracking.study, n_runs, varying).items():
            c.set_experiment_tag(exp_id, k, v)
        found = c.search_runs([exp_id], max_results=1,
                              filter_string=f"tags.`{TAG}sweep_key` = '{key}' and tags.`{TAG}role` = 'sweep'")
        tags = {TAG + "role": "sweep", TAG + "sweep_key": key, TAG + "host": socket.gethostname(),
                TAG + "pid": str(os.getpid()), TAG + "overrides": " ".join(overrides) or "(none)"}
        if config.tracking.study:
            tags[TAG + "study"] = config.tracking.study
        if found:
            run_id = found[0].info.run_id  # a relaunch: the same parent row in the UI
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
        self.parent, self.uri = run_id, uri

    def on_multirun_end(self, config, **kwargs) -> None:
        if getattr(self, "parent", None):
            client(self.uri).set_terminated(self.parent, status="FINISHED")
            log.info("sweep finished: parent run %s in %s", self.parent, resolve_uri(self.uri))

"""Small real stores of the built-in studies, made from each study's own YAML (conf/study/<name>.yaml)
at smoke size: its grid as `bnlab-train study=<name>` expands it, with a few overrides that shrink
the data, the epochs and the seeds (never a grid restated here). Training runs in-process with the
same config, hash and tags as a sweep job, into one temporary SQLite store per session."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Sequence

# What makes a study small: synthetic data (a few hundred examples), 2 seeds, one epoch where the
# study's own settings allow it (a milestone or a freeze epoch may need more), step-level
# evaluations every 2 steps where the study has any, one thread.
SMOKE = ["data=synthetic", "data.synthetic_train=512", "data.synthetic_val=128", "data.train_subset=null",
         "data.val_subset=null", "data.batch_size=32", "bn.precise_samples=128", "train.bs1_samples=16",
         "train.threads=1", "train.progress=false", "seed=0,1"]


def study_names() -> List[str]:
    """Every study found in the config directory."""
    from bnlab import cli

    return cli.available_studies()


def smoke_jobs(study: str, extra: Sequence[str] = ()) -> List:
    """The typed configs of every job of `study` at smoke size (its own grid, 2 seeds)."""
    from bnlab import cli
    from bnlab.config import ConfigError, register_configs

    register_configs()
    # The command line wins over the study's grid: a key the study sweeps keeps its values (the seeds
    # excepted: two are enough here).
    swept = {o.split("=", 1)[0] for o in cli.expand_jobs([f"study={study}"])[0][0]} - {"seed"}
    base = [f"study={study}", *(o for o in SMOKE if o.split("=", 1)[0] not in swept), *extra]
    first = cli.validate_job(cli.expand_jobs(base)[0][0])
    if first.train.eval_every:
        base += ["train.eval_every=2", "train.eval_subset=64"]
    jobs = cli.expand_jobs(base)[0]
    try:  # one epoch where the study's settings allow it
        cfgs = cli.validate_jobs([j + ["train.epochs=1"] for j in jobs])
    except ConfigError:
        cfgs = cli.validate_jobs(jobs)
    return list(zip(jobs, cfgs))


def build_store(home: Path, studies: Sequence[str], log=print) -> Dict[str, int]:
    """Train every smoke-size job of `studies` into <home>/runs/mlflow.db; {study: runs}."""
    from bnlab.roles import config_hash
    from bnlab.describe import run_name
    from bnlab.store import ensure_experiment
    from bnlab.tracking import MlflowTracker
    from bnlab.train import train

    os.environ["BNLAB_HOME"] = str(home)
    uri = f"sqlite:///{home / 'runs' / 'mlflow.db'}"
    (home / "runs").mkdir(parents=True, exist_ok=True)
    counts = {}
    for study in studies:
        t0 = time.time()
        jobs = smoke_jobs(study)
        ensure_experiment(uri, jobs[0][1].tracking.experiment)
        for overrides, cfg in jobs:
            tags = {"bnlab.study": study, "bnlab.role": "job", "bnlab.config_hash": config_hash(cfg),
                    "bnlab.overrides": " ".join(overrides)}
            train(cfg, MlflowTracker(uri, cfg.tracking.experiment, run_name(overrides)), extra_tags=tags)
        counts[study] = len(jobs)
        log(f"[{study}] {len(jobs)} runs in {time.time() - t0:.1f} s")
    return counts


if __name__ == "__main__":  # python tests/study_stores.py HOME [STUDY ...]: a store to look at
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    h = Path(sys.argv[1]).resolve()
    build_store(h, sys.argv[2:] or study_names())

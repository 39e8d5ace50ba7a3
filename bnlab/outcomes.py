"""What each job of a sweep ended as (finished, failed, skipped, diverged, a store failure, not
run), one line per job in a file of the sweep's folder, and the counts the launching process prints
and records on the parent run. A file, not the store: the count survives a store that can no longer
be written, and parallel workers append whole lines."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

OUTCOMES_DIR = ".bnlab_outcomes"
OUTCOMES = ("finished", "failed", "skipped", "diverged", "store_failed", "not_run")


def _outcome_file(sweep_dir) -> Path:
    token = os.environ.get("BNLAB_SWEEP_TOKEN") or os.environ.get("BNLAB_PARENT_RUN") or "sweep"
    return Path(str(sweep_dir)) / OUTCOMES_DIR / f"{token}.jsonl"


def record_outcome(sweep_dir, job: int, kind: str, detail: str = "") -> None:
    """One line per job in a file of this sweep (the launching process counts them at the end):
    the count survives a store that can no longer be written."""
    assert kind in OUTCOMES, kind
    f = _outcome_file(sweep_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"job": job, "outcome": kind, "detail": detail[:2000]}) + "\n"
    with open(f, "a") as fh:  # one short O_APPEND write per job: whole lines, even from parallel workers
        fh.write(line)


def read_outcomes(sweep_dir) -> List[dict]:
    f = _outcome_file(sweep_dir)
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def store_failure(sweep_dir) -> Optional[str]:
    """The first store failure of this sweep, if a job had one: later jobs do not start."""
    for o in read_outcomes(sweep_dir):
        if o["outcome"] == "store_failed":
            return o["detail"]
    return None


@dataclass
class SweepResult:
    counts: Counter
    store_error: Optional[str] = None
    parent_run_id: Optional[str] = None

    @property
    def failed(self) -> bool:
        return bool(self.counts["failed"] or self.counts["store_failed"] or self.store_error)

    def line(self) -> str:
        c = self.counts
        txt = (f"{c['finished']} finished, {c['failed'] + c['store_failed']} failed, {c['skipped']} skipped, "
               f"{c['diverged']} diverged")
        if self.store_error:
            txt += f"; stopped after the first store failure, {c['not_run']} job(s) not run: {self.store_error}"
        return txt


def summarise(sweep_dir, n_jobs: Optional[int]) -> SweepResult:
    outs = read_outcomes(sweep_dir)
    counts = Counter({k: 0 for k in OUTCOMES})
    counts.update(o["outcome"] for o in outs)
    if n_jobs is not None and len(outs) < n_jobs:
        counts["failed"] += n_jobs - len(outs)  # a job that died before recording its outcome
    return SweepResult(counts, store_failure(sweep_dir))

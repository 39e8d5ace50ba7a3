"""Time bnlab-train's preflight validation of a sweep's grid: cli.validate_jobs (one compose of
train.yaml per set of config-group overrides, the values applied to a copy by Hydra's own override
step) against one whole compose per job (cli.validate_job for each job). Not a test: run it and
read the numbers.

    python benchmarks/bench_preflight.py [--rounds 3] [--studies lr,batch_size,...]

For each study, both ways run on its full-size grid (as `bnlab-train study=NAME` expands it),
alternating which goes first each round; the figure per study is the median over rounds of the
CPU-time ratio (whole composes / validate_jobs), measured in this one process. Both give equal
Config objects (checked every round).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--studies", default="")
    a = ap.parse_args()
    os.environ.setdefault("BNLAB_HOME", tempfile.mkdtemp(prefix="bnlab-bench-"))
    from bnlab import cli
    from bnlab.config import register_configs

    register_configs()
    cli._prepare_env()
    names = [s for s in a.studies.split(",") if s] or cli.available_studies()
    total = {"whole": 0.0, "jobs": 0.0}
    print(f"{'study':<16} {'jobs':>5} {'whole compose/job':>18} {'validate_jobs':>14} {'ratio':>7}")
    for study in names:
        jobs, _ = cli.expand_jobs([f"study={study}"])
        t = {"whole": [], "jobs": []}
        for r in range(a.rounds):
            order = ["whole", "jobs"] if r % 2 == 0 else ["jobs", "whole"]
            got = {}
            for way in order:
                c0 = time.process_time()
                got[way] = ([cli.validate_job(j) for j in jobs] if way == "whole" else cli.validate_jobs(jobs))
                t[way].append(time.process_time() - c0)
            assert got["whole"] == got["jobs"], study
        ratio = statistics.median(w / j for w, j in zip(t["whole"], t["jobs"]))
        total["whole"] += statistics.median(t["whole"])
        total["jobs"] += statistics.median(t["jobs"])
        print(f"{study:<16} {len(jobs):>5} {statistics.median(t['whole']):>16.2f} s {statistics.median(t['jobs']):>12.2f} s "
              f"{ratio:>6.1f}x")
    print(f"{'all':<16} {'':>5} {total['whole']:>16.2f} s {total['jobs']:>12.2f} s "
          f"{total['whole'] / total['jobs']:>6.1f}x  (CPU seconds, medians of {a.rounds} rounds)")


if __name__ == "__main__":
    main()

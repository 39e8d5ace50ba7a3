"""Training speed on a machine that is not idle (issue 19). Not a test: run it and read the ratios.

    nice python benchmarks/bench_contention.py [--rounds N] [--examples N] [--competitors 0,1,2] [--more]

Conditions: idle, then 1 and 2 competing CPU-bound processes (each a pure-Python busy loop, one
core). Variants, each in a fresh child process (OpenMP reads its settings when torch loads):
  bnlab default   bnlab.train.setup + train_epoch with train.threads=null (bnlab.threads picks the
                  count from the free CPUs; OMP_WAIT_POLICY=PASSIVE set by importing bnlab first)
  plain PyTorch   the plain loop of bench_train.py (DataLoader, loss.item()) with torch's defaults:
                  every core, OpenMP's default wait policy (torch imported before bnlab)
  --more adds     bnlab with train.threads = every core (passive waits alone, no adapting)
Every round runs every condition and, inside it, every variant (order rotated), so drift of the
shared machine hits all alike; ratios are medians of per-round ratios. Each child trains one
untimed warm-up slice of 1,280 examples, then one timed epoch of --examples examples.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
BNLAB, PLAIN, ALLCORES = "bnlab default", "plain PyTorch", "bnlab, all cores"


def child(variant: str, n: int) -> None:
    if variant == PLAIN:
        import torch  # noqa: F401 - before bnlab: OpenMP keeps its default policy, as in a plain script
    else:
        import bnlab  # noqa: F401 - first, as bnlab-train does: sets OMP_WAIT_POLICY before torch loads
    sys.path.insert(0, str(HERE))
    import bench_train as bt

    import torch

    ds = bt.fashion(n)
    warm = bt.fashion(1280)
    if variant == PLAIN:
        threads = torch.get_num_threads()
        run = bt.plain_runner(ds, threads)  # runs one untimed warm-up epoch on ds itself
        eps = run()
    else:
        from bnlab.train import setup, train_epoch

        cfg = bt.bnlab_cfg(threads=os.cpu_count() if variant == ALLCORES else None)
        train_epoch(setup(cfg, data=warm), cfg.data.batch_size)
        s = setup(cfg, data=ds)
        threads = torch.get_num_threads()
        eps = train_epoch(s, cfg.data.batch_size)["perf/train_examples_per_s"]
    print(json.dumps({"eps": eps, "threads": threads, "omp": os.environ.get("OMP_WAIT_POLICY", "")}))


def measure(variant: str, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--examples", str(n)],
                         capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def competitors(k: int) -> List[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    time.sleep(1.0 if k else 0)  # let them reach the run queue before the next load sample
    return procs


def stop(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=6400)
    ap.add_argument("--competitors", default="0,1,2")
    ap.add_argument("--more", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.examples)
        return
    sys.path.insert(0, str(HERE.parent))
    from bnlab.threads import affinity_cpus, busy_cpus

    conds = [int(c) for c in args.competitors.split(",")]
    variants = [BNLAB, PLAIN] + ([ALLCORES] if args.more else [])
    print(f"== training on a shared CPU: LeNet-BN, batch 256, {args.examples:,} Fashion-MNIST examples per "
          f"timed epoch; {os.cpu_count()} CPU cores, nice {os.nice(0)}; load average at start "
          f"{os.getloadavg()[0]:.2f}; CPUs busy with other processes before any competitor "
          f"{busy_cpus(affinity_cpus(), 1.0):.2f}", flush=True)
    vals: Dict[int, Dict[str, List[float]]] = {c: {v: [] for v in variants} for c in conds}
    threads: Dict[int, Dict[str, int]] = {c: {} for c in conds}
    loads: Dict[int, List[float]] = {c: [] for c in conds}
    for r in range(args.rounds):
        for c in conds:
            procs = competitors(c)
            try:
                loads[c].append(busy_cpus(affinity_cpus(), 0.5))
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for v in order:
                    m = measure(v, args.examples)
                    vals[c][v].append(m["eps"])
                    threads[c][v] = m["threads"]
                    print(f"  round {r + 1}, {c} competitor(s), {v}: {m['eps']:,.0f} ex/s "
                          f"({m['threads']} thread(s), OMP_WAIT_POLICY={m['omp'] or 'unset'})", flush=True)
            finally:
                stop(procs)
    base = conds[0]
    print(f"\n  {'competitors':>11}  {'busy CPUs':>9}  " + "  ".join(f"{v + ' ex/s':>22}" for v in variants)
          + "  " + "  ".join(f"{v + ' / its idle':>24}" for v in variants) + f"  {'bnlab / plain':>13}")
    summary = {}
    for c in conds:
        med = {v: statistics.median(vals[c][v]) for v in variants}
        rel = {v: statistics.median(a / b for a, b in zip(vals[c][v], vals[base][v])) for v in variants}
        vs_plain = statistics.median(a / b for a, b in zip(vals[c][BNLAB], vals[c][PLAIN]))
        print(f"  {c:>11}  {statistics.median(loads[c]):9.2f}  "
              + "  ".join(f"{med[v]:>17,.0f} ({threads[c][v]}t)" for v in variants) + "  "
              + "  ".join(f"{rel[v]:>23.2f}x" for v in variants) + f"  {vs_plain:>12.2f}x")
        summary[c] = {"median_eps": med, "vs_idle": rel, "bnlab_vs_plain": vs_plain, "threads": threads[c],
                      "busy_cpus": loads[c]}
    if 1 in summary and base == 0:
        r1 = summary[1]["vs_idle"][BNLAB]
        print(f"\n  bnlab default with one competitor: {r1:.2f}x its idle throughput "
              f"(target >= 0.40: {'met' if r1 >= 0.40 else 'NOT met'})")
    print(json.dumps({str(k): v for k, v in summary.items()}))


if __name__ == "__main__":
    main()

"""Time bnlab.analysis.runs (load_runs + load_curves) against the per-run MLflow loop on a SQLite
store of 1,000 runs x 20 epochs x 8 metrics (defaults). Not a test: run it and read the numbers.

    python benchmarks/bench_load_runs.py [--runs 1000] [--epochs 20] [--metrics 8] [--sample 50]

The store is created by MlflowClient (schema and experiment), then filled by a bulk insert into
MLflow's tables, which is not what is timed; one run is read back through MlflowClient to check the
rows are what MLflow itself would have written. The naive loop (get_metric_history per run and
metric) is timed on --sample runs and extrapolated linearly to all runs.
"""
from __future__ import annotations

import argparse
import math
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bnlab.config import Config, flatten, to_plain

METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/acc_batch_stats", "val/acc_precise_bn",
           "gap/acc", "bnstats/mean_err", "bnstats/var_err", "perf/train_examples_per_s"]
EXPERIMENT = "bench"


def fill(db: Path, n_runs: int, epochs: int, n_metrics: int) -> str:
    """Create the store with MlflowClient, then insert the runs directly; returns the experiment id."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{db}"
    exp_id = MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(db.parent / "art").as_uri())
    keys = METRICS[:n_metrics]
    base = flatten(to_plain(Config()))
    runs, params, tags, metrics, latest = [], [], [], [], []
    t0 = int(time.time() * 1000)
    for i in range(n_runs):
        rid = uuid.uuid4().hex
        mom, bs, seed = [0.0, 0.001, 0.01, 0.1, 0.3, 1.0, None][i % 7], [16, 64, 256, 1024][i // 7 % 4], i // 28
        p = {**base, "seed": seed, "bn.momentum": mom, "data.batch_size": bs, "tracking.experiment": EXPERIMENT}
        name = f"bn.momentum={mom},data.batch_size={bs},seed={seed}"
        runs.append((rid, name, "LOCAL", "", "", "bench", "FINISHED", t0 + i, t0 + i + 1000, "", "active",
                     f"file:///dev/null/{rid}", int(exp_id)))
        params += [(k, str(v), rid) for k, v in p.items()]
        tags += [(k, v, rid) for k, v in {"mlflow.runName": name, "bnlab.role": "job", "bnlab.study": EXPERIMENT,
                                         "bnlab.seed": str(seed), "bnlab.diverged": "false",
                                         "bnlab.git_commit": "0" * 40, "bnlab.git_dirty": "false"}.items()]
        for k in keys:
            for step in range(1, epochs + 1):
                v = math.exp(-step / 5) * (1 + (i % 13) / 100) + 0.01 * keys.index(k)
                metrics.append((k, v, t0 + step, rid, step, 0))
            latest.append((k, v, t0 + epochs, epochs, 0, rid))
    con = sqlite3.connect(db)
    with con:
        con.executemany("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, "
                        "status, start_time, end_time, source_version, lifecycle_stage, artifact_uri, "
                        "experiment_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?,?,?)", params)
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?,?,?)", tags)
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)",
                        metrics)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                        "VALUES (?,?,?,?,?,?)", latest)
    con.close()
    # MLflow reads a run back as written (params, latest metrics, one history).
    c = MlflowClient(uri)
    r = c.get_run(runs[0][0])
    assert len(r.data.params) == len(base) and len(r.data.metrics) == len(keys), "store rows are not MLflow's"
    assert len(c.get_metric_history(runs[0][0], keys[0])) == epochs
    return exp_id


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--metrics", type=int, default=8, help=f"metrics per run (at most {len(METRICS)})")
    ap.add_argument("--sample", type=int, default=50, help="runs timed in the naive loop, then extrapolated")
    ap.add_argument("--repeat", type=int, default=3, help="timings of the bulk reader (the median is shown)")
    ap.add_argument("--http", action="store_true", help="also time both readers through a local `mlflow server`")
    a = ap.parse_args(argv)
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from bnlab.analysis.runs import load_curves, load_runs

    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as tmp:
        db = Path(tmp) / "mlflow.db"
        uri = f"sqlite:///{db}"
        t = time.perf_counter()
        exp_id = fill(db, a.runs, a.epochs, a.metrics)
        n_points = a.runs * a.epochs * a.metrics
        print(f"store: {a.runs} runs x {a.epochs} epochs x {a.metrics} metrics = {n_points:,} points "
              f"({db.stat().st_size / 2**20:.1f} MiB), written in {time.perf_counter() - t:.1f} s (not timed below)")

        times_runs, times_curves = [], []
        for _ in range(a.repeat):
            t = time.perf_counter()
            runs = load_runs(EXPERIMENT, uri)
            t1 = time.perf_counter()
            curves = load_curves(EXPERIMENT, uri, runs=runs)
            t2 = time.perf_counter()
            times_runs.append(t1 - t)
            times_curves.append(t2 - t1)
        assert len(runs) == a.runs and len(curves) == n_points, (len(runs), len(curves))
        bulk = statistics.median(times_runs) + statistics.median(times_curves)
        print(f"bnlab load_runs   : {statistics.median(times_runs):6.2f} s  (median of {a.repeat}: "
              f"{', '.join(f'{x:.2f}' for x in times_runs)})")
        print(f"bnlab load_curves : {statistics.median(times_curves):6.2f} s  (median of {a.repeat}: "
              f"{', '.join(f'{x:.2f}' for x in times_curves)})")
        print(f"bnlab total       : {bulk:6.2f} s  -> {len(runs)} rows x {runs.shape[1]} columns, "
              f"{len(curves):,} curve points")

        # The naive way: search_runs pages for the runs, then get_metric_history per run and metric.
        c = MlflowClient(uri)
        t = time.perf_counter()
        found, token = [], None
        while True:
            page = c.search_runs([exp_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            found += page
            token = page.token
            if not token:
                break
        t_search = time.perf_counter() - t
        sample = found[:a.sample]
        t = time.perf_counter()
        naive = {}
        for r in sample:
            for k in r.data.metrics:
                for m in c.get_metric_history(r.info.run_id, k):
                    naive[(r.info.run_id, k, m.step)] = m.value
        t_loop = time.perf_counter() - t
        per_run = t_loop / len(sample)
        naive_total = t_search + per_run * a.runs
        # Same numbers from both readers.
        got = curves.set_index(["run_id", "metric", "step"])["value"]
        assert all(got[key] == v for key, v in naive.items()), "bulk and per-run readers disagree"
        print(f"naive search_runs : {t_search:6.2f} s  (all {len(found)} runs, pages of 1000)")
        print(f"naive history loop: {t_loop:6.2f} s  for {len(sample)} runs x {a.metrics} metrics "
              f"({len(sample) * a.metrics} get_metric_history calls, {1000 * per_run / a.metrics:.1f} ms each)")
        print(f"naive total       : {naive_total:6.2f} s  (EXTRAPOLATED: search_runs + {per_run * 1000:.0f} ms/run "
              f"x {a.runs} runs, from the {len(sample)}-run sample)")
        print(f"ratio             : {naive_total / bulk:6.1f}x  (naive / bnlab)")
        if a.http:
            bench_http(db, exp_id, a, n_points)
    return 0


def bench_http(db: Path, exp_id: str, a, n_points: int) -> None:
    """The same two readers through `mlflow server` on a free loopback port."""
    import os
    import signal
    import socket
    import subprocess
    import urllib.request

    from mlflow.tracking import MlflowClient

    from bnlab.analysis.runs import load_curves, load_runs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            # No GenAI job runner: its eight worker processes start with the server and
                            # take the CPU for about 30 s, which would be timed as the reader's cost.
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        # The server's first store request is slow (seconds: it opens and checks the store); not timed.
        t = time.perf_counter()
        MlflowClient(url).search_runs([exp_id], max_results=1)
        print(f"HTTP server warm-up: {time.perf_counter() - t:6.2f} s  (first request, not timed below)")
        t = time.perf_counter()
        runs = load_runs(EXPERIMENT, url)
        t1 = time.perf_counter()
        curves = load_curves(EXPERIMENT, url, runs=runs)
        t2 = time.perf_counter()
        assert len(runs) == a.runs and len(curves) == n_points
        bulk, t_search = t2 - t, t1 - t  # load_runs is search_runs pages plus typing: the naive loop's start too
        print(f"HTTP bnlab        : {bulk:6.2f} s  (load_runs {t1 - t:.2f} s: search_runs pages; load_curves "
              f"{t2 - t1:.2f} s: bulk history, 100 runs x 1 metric per request)")
        c = MlflowClient(url)
        sample = runs["run_id"].tolist()[:a.sample]
        keys = sorted({k[len("final/"):] for k in runs.columns if k.startswith("final/")})
        t = time.perf_counter()
        for rid in sample:
            for k in keys:
                c.get_metric_history(rid, k)
        per_run = (time.perf_counter() - t) / len(sample)
        naive = t_search + per_run * a.runs
        print(f"HTTP naive        : {naive:6.2f} s  (EXTRAPOLATED: search_runs {t_search:.2f} s + "
              f"{per_run * 1000:.0f} ms/run x {a.runs} runs, from {len(sample)} runs)")
        print(f"HTTP ratio        : {naive / bulk:6.1f}x  (naive / bnlab)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())

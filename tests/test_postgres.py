"""MLflow on PostgreSQL: bnlab-ui serves a throw-away PostgreSQL cluster, a real sweep logs
through it, and 32 concurrent writers lose and duplicate no run while the server's database
connections stay within the bound bnlab-ui sets."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from bnlab.ui import db_pool_env
from cluster import bnlab_ui, db_connections, postgres, process_tree
from conftest import runs_of

pytestmark = pytest.mark.cluster

WRITERS = int(os.environ.get("BNLAB_PG_WRITERS", 32))  # a smaller count to probe a slow machine
CONTESTED = WRITERS // 4  # grid points that two writers try to claim at the same moment
EPOCHS = 5
WORKERS = 4


@pytest.fixture(scope="module")
def pg_server():
    with postgres() as db:
        with bnlab_ui(db, workers=WORKERS) as (url, pid):
            # bnlab-ui -> the MLflow CLI -> uvicorn -> its workers (multiprocessing spawn), each
            # worker a pool of its own; the others serve no request
            tree, workers = _server_processes(pid)
            assert len(workers) == WORKERS, tree
            yield db, url, SimpleNamespace(root=pid, pids=tree, workers=workers,
                                           connections=lambda: db_connections(tree, urlsplit(db).port))


def _server_processes(root: int) -> tuple:
    tree = process_tree(root)
    return tree, [p for p in tree if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_a_sweep_logs_through_postgres(pg_server, home, run_cli):
    db, url, _ = pg_server
    r = run_cli("bnlab-train", "study=smoke", "train.threads=1", f"tracking.uri={url}", home=home)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 finished, 0 failed, 0 skipped" in r.stdout
    c, runs = runs_of(home, "smoke", uri=db)  # read straight from the database
    jobs = [x for x in runs if x.data.tags.get("bnlab.role") == "job"]
    assert sorted(x.info.status for x in jobs) == ["FINISHED"] * 4
    assert len({x.data.tags["bnlab.config_hash"] for x in jobs}) == 4
    assert all([m.step for m in c.get_metric_history(x.info.run_id, "val/acc")] == [1] for x in jobs)


def _writer(url: str, i: int, sweep_dir: str, start: "mp.synchronize.Event", out: "mp.Queue") -> None:
    """One sweep job without the training: the real claim (bnlab.sweep.job_context over HTTP),
    then a run's whole life through the real tracker."""
    import os

    # 32 writers and the server share this machine's cores: a request may queue behind the others'
    # for longer than bnlab's 10 s default (bnlab.tracking.HTTP_ENV); the environment's value wins.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "600"
    from bnlab import sweep
    from bnlab.config import Config

    cfg = Config()
    cfg.tracking.uri, cfg.tracking.experiment = url, "load"
    # writers 0..2*CONTESTED-1 pair up on CONTESTED seeds; the others have a seed each
    cfg.seed = i // 2 if i < 2 * CONTESTED else i - CONTESTED
    hc = SimpleNamespace(sweep=SimpleNamespace(dir=sweep_dir), job=SimpleNamespace(num=i))
    out.put((i, "ready", ""))
    start.wait()
    try:
        ctx = sweep.job_context(cfg, hc, [f"seed={cfg.seed}"], True)
        if ctx.skip_reason:
            out.put((i, "skipped", ctx.skip_reason))
            return
        t = ctx.tracker
        t.start({"seed": cfg.seed}, ctx.tags, "seed: %d\n" % cfg.seed)
        for e in range(1, EPOCHS + 1):
            t.log_epoch(e, {"train/loss": 1.0 / e, "val/acc": e / 10})
        t.end("FINISHED")
        out.put((i, "finished", t.run_id))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put((i, "error", repr(e)))


def test_32_concurrent_writers_lose_and_duplicate_nothing(pg_server, tmp_path):
    db, url, server = pg_server
    from bnlab.store import ensure_experiment

    ensure_experiment(url, "load")
    # Not a plain fork of this process: MLflow's client starts threads (telemetry) whose locks a fork
    # can copy held. A forkserver is a fresh process that only imports (no client, no thread), and
    # each writer forks from it: 32 writers do not import MLflow and bnlab 32 times over.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "bnlab.sweep", "bnlab.tracking", "bnlab.store", "mlflow.tracking"])
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, i, str(tmp_path), start, out)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    samples, cost, stop = [server.connections()], [], threading.Event()

    def sample():  # a sampler can miss a peak between two samples, never count one that was not
        while not stop.is_set():
            t = time.perf_counter()
            samples.append(server.connections())
            cost.append(time.perf_counter() - t)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in procs:  # every writer imported and waiting: they start together
        assert out.get(timeout=600)[1] == "ready"
    t0 = time.time()
    start.set()
    results = [out.get(timeout=900) for _ in procs]
    wall = time.time() - t0
    for p in procs:
        p.join(60)
    stop.set()
    sampler.join()
    samples.append(server.connections())  # after the writers: what the workers' pools kept open
    assert _server_processes(server.root) == (server.pids, server.workers)  # no worker was replaced
    peak = {pid: max(s.get(pid, 0) for s in samples) for pid in server.pids}
    pool = db_pool_env(db, dict(os.environ))  # the per-worker bound bnlab-ui set for the server
    errors = [r for r in results if r[1] == "error"]
    assert not errors, f"{len(errors)} writer(s) failed: {errors}"
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=db)
    exp = c.get_experiment_by_name("load")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    fin = [r for r in runs if r.info.status == "FINISHED"]
    seeds = [r.data.params["seed"] for r in fin]
    want = WRITERS - CONTESTED
    total = max(sum(s.values()) for s in samples)
    print(f"\n{WRITERS} writers in {wall:.1f} s: {len(fin)} FINISHED runs, "
          f"{sum(r[1] == 'skipped' for r in results)} skipped claims; the server's database connections "
          f"({len(samples)} samples, {sum(cost) / len(cost) * 1e3:.1f} ms each): peak {total} in all, per worker "
          f"{[peak[p] for p in server.workers]}, others {[peak[p] for p in server.pids if p not in server.workers]}, "
          f"before the writers {[samples[0].get(p, 0) for p in server.pids]}")
    assert len(fin) == want and len(set(seeds)) == want, sorted(seeds)  # none lost, none twice
    assert [r for r in runs if r.info.status != "FINISHED"] == []  # lost claims are deleted
    assert sum(r[1] == "skipped" for r in results) == CONTESTED
    for r in fin:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val/acc")] == list(range(1, EPOCHS + 1))
    # bnlab-ui caps each worker's pool (4 + 2 overflow); the other processes serve no request and
    # open none under load (the MLflow CLI keeps those of its start-up store initialisation)
    assert max(peak[p] for p in server.workers) > 0  # the count sees the workers' connections
    assert all(peak[p] <= pool for p in server.workers), (pool, peak, server.workers)
    assert all(peak[p] <= samples[0].get(p, 0) for p in server.pids if p not in server.workers), (peak, samples[0])

"""The only module that writes MLflow runs: a run tracker that logs one batch of metrics per epoch
(and the claim heartbeat), its checkpoints and model, and BackgroundTracker, which can move those
writes to a logging process. Where the store is and the client it is written through: bnlab.store.
train() receives a tracker; it never imports mlflow."""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Tuple

from bnlab import faults
from bnlab.store import (MODEL_ARTIFACT, MODEL_SOURCE, TAG, StoreError, client, ensure_experiment, heartbeat_tag,
                         owner_tags, resolve_uri, root_cause)

log = logging.getLogger("bnlab")


class NullTracker:
    """Logs nothing: for library use and tests that need no store."""

    run_id: Optional[str] = None

    def start(self, params: Mapping[str, object], tags: Mapping[str, str], config_text: str) -> None:
        pass

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, state: Mapping[str, object], config_text: str) -> None:
        pass

    def end(self, status: str, error: Optional[str] = None) -> None:
        pass

    def where(self) -> str:
        return "not logged"


class MlflowTracker:
    """One MLflow run, written through MlflowClient (no global fluent state)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: str,
                 parent_run_id: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.run_id: Optional[str] = None
        self.resumed = False  # True once take_over() claimed an interrupted run
        self._client = None

    def _fail(self, what: str, e: BaseException) -> StoreError:
        run = f"run {self.run_id}" if self.run_id else "no run"
        return StoreError(f"store {self.uri} failed ({root_cause(e)}); not written: {what} ({run})")

    def claim(self, tags: Mapping[str, str]) -> str:
        """Create the run RUNNING before anything trains: it claims its grid point (tags carry the
        config hash, the owner and a heartbeat). start() then fills in params and tags."""
        try:
            self._client = client(self.uri)
            exp_id = ensure_experiment(self.uri, self.experiment)
            all_tags = {**tags, **owner_tags(), **heartbeat_tag()}
            if self.parent_run_id:
                all_tags["mlflow.parentRunId"] = self.parent_run_id
            faults.point("claim_create", job=tags.get(TAG + "job"))
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=all_tags)
        except Exception as e:
            raise self._fail("the run's claim", e) from e
        self.run_id = run.info.run_id
        return self.run_id

    def take_over(self, run_id: str, tags: Mapping[str, str]) -> str:
        """Claim an interrupted (KILLED) run of this grid point instead of a new one: it turns
        RUNNING again under this process, and train() resumes it from its last checkpoint. Why it
        stopped moves from its error tag to `interrupted`: a run that then finishes has no error."""
        from mlflow.entities import RunTag

        try:
            self._client = client(self.uri)
            why = self._client.get_run(run_id).data.tags.get(TAG + "error")
            self._client.update_run(run_id, status="RUNNING")
            ts = {**tags, **owner_tags(), **heartbeat_tag(), TAG + "resumed": f"{time.time():.0f}"}
            if why:
                ts[TAG + "interrupted"] = why
            self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in ts.items()])
            if why:
                self._client.delete_tag(run_id, TAG + "error")
        except Exception as e:
            raise self._fail("the take-over of an interrupted run", e) from e
        self.run_id, self.resumed = run_id, True
        return run_id

    def load_checkpoint(self) -> Optional[Tuple[Optional[bytes], int]]:
        """(the last complete epoch's checkpoint, None if it was killed in its first epoch; the
        last step-level step logged) of a run taken over; None for a new run."""
        from bnlab import checkpoint as ck

        if not getattr(self, "resumed", False):
            return None
        import tempfile

        run = self._client.get_run(self.run_id)
        epoch, blob = ck.last_epoch(run.data.tags), None
        if epoch is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = self._client.download_artifacts(self.run_id, f"{ck.CHECKPOINT_DIR}/{ck.name(epoch)}", tmp)
                blob = Path(path).read_bytes()
        # Step-level curves may run past the checkpoint (logged during the epoch that was cut short).
        steps = [k for k in run.data.metrics if k.startswith("step/")]
        last_step = max((m.step for m in self._client.get_metric_history(self.run_id, steps[0])), default=0) \
            if steps else 0
        return blob, last_step

    def checkpoint(self, epoch: int, metrics: Mapping[str, float], blob: bytes) -> None:
        """The epoch's checkpoint file first, then its metrics with the checkpoint tag in one store
        write (the commit point: a kill in between leaves the previous checkpoint in force), then
        the previous epoch's file is removed."""
        import tempfile

        from bnlab import checkpoint as ck

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / ck.name(epoch)
                path.write_bytes(blob)
                self._client.log_artifact(self.run_id, str(path), ck.CHECKPOINT_DIR)
        except Exception as e:
            raise self._fail(f"the checkpoint of epoch {epoch}", e) from e
        self.log_epoch(epoch, metrics, {ck.EPOCH_TAG: str(epoch)})
        if epoch > 1:
            self._delete_artifacts(f"{ck.CHECKPOINT_DIR}/{ck.name(epoch - 1)}")

    def _delete_artifacts(self, path: str) -> None:
        # MlflowClient has no delete; the run's artifact repository has (file and mlflow-artifacts).
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            uri = self._client.get_run(self.run_id).info.artifact_uri
            get_artifact_repository(uri, tracking_uri=self.uri).delete_artifacts(path)
        except Exception as e:  # noqa: BLE001 - a leftover file costs disk, not correctness
            log.warning("could not delete artifact %s of run %s: %s", path, self.run_id, root_cause(e))

    def start(self, params: Mapping[str, object], tags: Mapping[str, str], config_text: str) -> None:
        from mlflow.entities import Param, RunTag

        if self.run_id is None:
            self.claim(tags)
        try:
            # MLflow caps a param value at 6000 characters; one batch call for all of them.
            ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
            ts = [RunTag(k, str(v)) for k, v in {**tags, **heartbeat_tag()}.items()]
            for i in range(0, max(len(ps), 1), 100):
                self._client.log_batch(self.run_id, params=ps[i:i + 100], tags=ts if i == 0 else [])
            self._client.log_text(self.run_id, config_text, "config.yaml")
        except Exception as e:
            raise self._fail("params, tags and config.yaml", e) from e

    def log_epoch(self, step: int, metrics: Mapping[str, float], tags: Optional[Mapping[str, str]] = None) -> None:
        """Every metric of one epoch, and the heartbeat, in a single call (one SQLite transaction /
        HTTP request)."""
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        beat = [RunTag(k, v) for k, v in {**heartbeat_tag(), **(tags or {})}.items()]
        try:
            self._client.log_batch(self.run_id, metrics=batch, tags=beat)
        except Exception as e:
            raise self._fail(f"the metrics of epoch {step} and later", e) from e

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        try:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as e:
            raise self._fail(f"tags {', '.join(tags)}", e) from e

    def log_model(self, state: Mapping[str, object], config_text: str) -> None:
        """The final state dict (CPU tensors) and the resolved config (JSON text) as one artifact,
        MODEL_ARTIFACT, that bnlab.load_run rebuilds the model from."""
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_ARTIFACT
            torch.save({"state_dict": dict(state), "config": config_text}, path)
            self._client.log_artifact(self.run_id, str(path))
        source = json.loads(config_text).get("source") if config_text.lstrip().startswith("{") else None
        if source:  # a custom model's module, readable in the UI too (model.pt holds the same text)
            self._client.log_text(self.run_id, source["text"], f"{MODEL_SOURCE}/{Path(source['file']).name}")

    def end(self, status: str, error: Optional[str] = None) -> None:
        if self.run_id is None:
            return
        if status == "FINISHED":  # the final model is kept (log_model); checkpoints are not needed
            from bnlab import checkpoint as ck

            self._delete_artifacts(ck.CHECKPOINT_DIR)
            try:
                self._client.delete_tag(self.run_id, ck.EPOCH_TAG)
            except Exception:  # noqa: BLE001 - never set (no epoch completed), or already gone
                pass
        if error:
            self.set_tags({TAG + "error": error[:5000]})
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:
            raise self._fail(f"the run's end status {status}", e) from e

    def where(self) -> str:
        if self.run_id is None:
            return "no run"
        try:
            exp_id = f" (id {self._client.get_experiment_by_name(self.experiment).experiment_id})"
        except Exception:  # noqa: BLE001 - the store may have gone since the run ended; say where anyway
            exp_id = ""
        return f"experiment '{self.experiment}'{exp_id}, run {self.run_id} '{self.run_name}' in {self.uri}"


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


# ----------------------------------------------------------------------------- logging off the loop

# The logging process: reads the pickled tracker, then (method, args) pairs from stdin, calls them
# in order, and answers on its own copy of stdout: ("ready", None) once the tracker is loaded and
# ("flushed", first error or None) at every "__flush__". It ignores Ctrl-C so that it can still
# write what was queued; EOF on stdin (the trainer ended or died) ends it. It ignores SIGUSR2 and
# SIGTERM too: SLURM signals every process of a task (preemption's USR2, then the requeue's TERM),
# and acting on them is the trainer's part (submitit's handler ends the run KILLED, which first
# waits for this process to write what was queued); SIGKILL after SLURM's KillWait still ends it.
_LOG_PROCESS = r"""
import os, pickle, signal, sys, traceback
for s in (signal.SIGINT, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # stray prints go to stderr, not into the protocol
def send(msg):
    pickle.dump(msg, out)
    out.flush()
def why(e):
    return "".join(traceback.format_exception_only(type(e), e)).strip()
try:
    tracker = pickle.load(inp)
except BaseException as e:
    send(("failed", why(e)))
    sys.exit(1)
send(("ready", None))
error = None
while True:
    try:
        name, args = pickle.load(inp)
    except EOFError:
        break
    if name == "__flush__":
        send(("flushed", error))
        error = None
    elif error is None:  # after a failure, drop the rest: the run ends FAILED
        try:
            getattr(tracker, name)(*args)
        except BaseException as e:
            error = why(e)
"""


class BackgroundTracker:
    """A tracker's log_epoch and set_tags, either synchronous or, with process=True, written by a
    separate logging process so that a store write (3-4 ms on SQLite, ~90 ms over HTTP) costs the
    training thread only a pickle and a pipe write.

    A thread does not do: the write is mostly Python (SQLAlchemy) and holds the GIL, and measured
    here a log call in a background thread cost the training thread as much time as the call
    itself (benchmarks/bench_train.py overheads). The process starts after tracker.start(), gets
    a pickled copy of the tracker, and takes over once it reports ready (until then, and for a
    tracker that does not pickle or a platform without select() on pipes, calls stay synchronous).
    Calls keep their order. start() and end() run here; end() first waits for every queued call.
    A failed call in the process is raised here at the next flush()/end(), so train() records the
    run FAILED.
    """

    def __init__(self, tracker, process: bool = False, timeout_s: float = 120.0):
        self.tracker = tracker
        self.timeout_s = timeout_s
        self._want_process = process and os.name == "posix" and not isinstance(tracker, NullTracker)
        self._proc: Optional[subprocess.Popen] = None
        self._ready = False

    @property
    def run_id(self):
        return getattr(self.tracker, "run_id", None)

    @property
    def in_process(self) -> bool:
        """True once calls go to the logging process."""
        return self._ready

    def start(self, params, tags, config_text: str) -> None:
        self.tracker.start(params, tags, config_text)
        if self._want_process:
            self._spawn()

    def _spawn(self) -> None:
        try:
            blob = pickle.dumps(self.tracker)
        except Exception as e:  # noqa: BLE001 - any tracker may be handed in; stay synchronous
            log.debug("tracker does not pickle (%s): logging synchronously", e)
            return
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", _LOG_PROCESS], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
            self._proc.stdin.write(blob)
            self._proc.stdin.flush()
        except OSError as e:
            log.warning("could not start the logging process (%s): logging synchronously", e)
            self._close()

    def _poll_ready(self) -> None:
        # Non-blocking: switch to the process once its "ready" is readable.
        if self._proc is None or self._ready:
            return
        if not select.select([self._proc.stdout], [], [], 0)[0]:
            return
        kind, why = self._read()
        if kind == "ready":
            self._ready = True
        else:
            log.warning("the logging process could not load the tracker (%s): logging synchronously", why)
            self._close()

    def _read(self) -> Tuple[str, Optional[str]]:
        try:
            return pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError) as e:
            return "failed", f"logging process ended unexpectedly ({type(e).__name__})"

    def _call(self, name: str, *args) -> None:
        self._poll_ready()
        if not self._ready:
            getattr(self.tracker, name)(*args)
            return
        try:
            pickle.dump((name, args), self._proc.stdin)
            self._proc.stdin.flush()
        except OSError as e:
            raise RuntimeError(f"logging process is gone ({e}); metrics may be missing") from e

    def log_epoch(self, step: int, metrics) -> None:
        self._call("log_epoch", step, dict(metrics))

    def set_tags(self, tags) -> None:
        self._call("set_tags", dict(tags))

    def load_checkpoint(self):
        """The wrapped tracker's checkpoint of a run it took over (None: nothing to resume)."""
        return getattr(self.tracker, "load_checkpoint", lambda: None)()

    def checkpoint(self, epoch: int, metrics, blob: bytes) -> None:
        """The epoch's metrics with its checkpoint; a tracker that keeps none only logs the metrics."""
        if hasattr(self.tracker, "checkpoint"):
            self._call("checkpoint", epoch, dict(metrics), blob)
        else:
            self.log_epoch(epoch, metrics)

    def log_model(self, state, config_text: str) -> None:
        # A tracker of the user's own (train(cfg, tracker)) need not keep models: skip it then.
        if not hasattr(self.tracker, "log_model"):
            return
        self._call("log_model", dict(state), config_text)

    def flush(self) -> None:
        """Wait until every queued call is written; raise the first error if one failed."""
        if not self._ready:
            return
        self._call("__flush__")
        # Blocking read; the process answers once everything before the flush has run.
        ready = select.select([self._proc.stdout], [], [], self.timeout_s)[0]
        kind, why = self._read() if ready else ("failed", f"no answer in {self.timeout_s:.0f} s")
        if kind != "flushed" or why is not None:
            self._close()
            # A store failure stays one (the sweep stops after it); anything else is this run's error.
            err = StoreError if why and why.startswith(("StoreError", "bnlab.store.StoreError")) else RuntimeError
            raise err(f"a tracker call failed in the logging process: {why}")

    def _close(self) -> None:
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def end(self, status: str, error: Optional[str] = None) -> None:
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - still end the run, with the logging error
            if status == "FINISHED":
                status, error = "FAILED", str(e)
            log.warning("%s", e)
        finally:
            self._close()
        self.tracker.end(status, error)

    def where(self) -> str:
        return self.tracker.where()


# ----------------------------------------------------------------------------- report artifacts

def attach_to_latest_sweep(uri: Optional[str], experiment: str, folder: Path,
                           artifact_path: str = "report") -> Optional[str]:
    """Log every file of `folder` (a study's figures, summary.csv, section.md) as artifacts of the
    experiment's most recent sweep parent run, so the UI shows the answer beside the runs.
    Returns that run's id, or None when the experiment has no sweep run."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}role` = 'sweep'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    c.log_artifacts(run_id, str(folder), artifact_path)
    return run_id

"""train(cfg, tracker) -> final metrics: one run, its per-epoch (and optional per-step) evaluations,
logged through the tracker it is given. Knows nothing of Hydra or MLflow. The training loop (setup,
TrainStep, train_epoch) is public so that benchmarks time exactly the code a run executes."""
from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import bn as bnm
from bnlab import checkpoint as ckpt
from bnlab import describe, faults
from bnlab.config import DIVERGED_LOSS, Config, ConfigError, Device
from bnlab.roles import config_hash
from bnlab.data import Dataset, load_data, train_batches
from bnlab.evaluation import epoch_metrics, precise_source
from bnlab.load import model_artifact
from bnlab.models import build_model, natural_shape
from bnlab.schedule import lr_at
from bnlab.threads import auto_threads
from bnlab.store import TAG, StoreError
from bnlab.tracking import BackgroundTracker, NullTracker

log = logging.getLogger("bnlab")


def resolve_device(d: Device) -> torch.device:
    if d == Device.cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    if d == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d.value)


def device_name(d: torch.device) -> str:
    """What a run ran on, for its tag bnlab.device_used and the report: 'cpu', 'cuda (NVIDIA H200)'."""
    if d.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(d)})"
    return d.type


# Step-level metrics (train.eval_every) carry this prefix and MLflow step = global SGD step;
# epoch-level metrics have no prefix and MLflow step = epoch. One name, one meaning: step/val/acc is
# val/acc measured after that many SGD steps (on train.eval_subset examples, if set).
STEP_PREFIX = "step/"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()),
                mininterval=0.5, unit="batch")




def diverged(train_loss: float) -> bool:
    """The divergence rule (bnlab.config.DIVERGED_LOSS): NaN/inf, or a finite loss that exploded."""
    return not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS


def chance_warning(cfg: Config, train_acc: float, y_train: torch.Tensor, seen: int) -> Optional[str]:
    """The warning for a run that is not learning: after the first epoch its training accuracy is
    within 3 binomial standard errors (over the `seen` training examples) of always guessing the
    most frequent class. None when it learns."""
    p = float(torch.bincount(y_train.cpu()).max()) / max(len(y_train), 1)
    if seen < 1 or train_acc > p + 3.0 * math.sqrt(p * (1 - p) / seen):
        return None
    hint = (" model=custom starts from SGD lr 0.1, momentum 0.9 (conf/model/custom.yaml); try another optim.lr"
            if cfg.model.name.value == "custom" else " try another optim.lr")
    return (f"train/acc {train_acc:.3f} after epoch 1 is chance level ({p:.3f}): the network is not learning "
            f"at optim.lr={cfg.optim.lr:g};{hint}")


def run_tags(cfg: Config) -> Dict[str, str]:
    return {TAG + "config_hash": config_hash(cfg), TAG + "seed": str(cfg.seed),
            TAG + "diverged": "false"}


# ----------------------------------------------------------------------------- the training loop

class TrainStep:
    """One SGD step per call, and the epoch's sums of loss and correct predictions kept on the
    device (read once per epoch: no host sync per step).

    Options (TrainConfig): `compile` runs forward + loss through torch.compile (backward through
    AOTAutograd); `amp` autocasts the forward to bfloat16 while every BN normalises in float32
    (bnlab's BatchNorm upcasts half inputs) and the loss is taken in float32; `cuda_graphs`
    (CUDA only) records the whole step, sums included, as one CUDA graph after a few eager warm-up
    steps and replays it for every later batch. The warm-up steps are ordinary training steps, so
    the run sees the same batches either way.
    """

    WARMUP_STEPS = 3  # eager steps on a side stream before capture (torch.cuda.graphs docs)

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, *,
                 compile: bool = False, amp: bool = False, cuda_graphs: bool = False):
        self.model, self.opt, self.device = model, opt, device
        self.amp = amp
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # float32 sums as before (exact for counts below 2**24 per epoch).
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self._forward = self._forward_loss
        if compile:
            # On CPU inductor's layout optimisation turns the conv outputs channels-last and then
            # vectorises BN over 6 or 16 channels (masked 16-lane vectors): measured slower here.
            options = {"layout_optimization": False} if device.type == "cpu" else None
            self._forward = torch.compile(self._forward_loss, options=options)
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self._static: Tuple[torch.Tensor, ...] = ()
        self._warm = 0

    def _forward_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.amp:
            # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
                out = self.model(xb)
        else:
            out = self.model(xb)
        # Under autocast the loss is taken in float32; otherwise in the model's own dtype (a float64
        # model, as the compile test's reference, keeps float64 logits).
        loss = F.cross_entropy(out.float() if self.amp else out, yb)
        return loss, (out.argmax(1) == yb).sum()

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss, hits = self._forward(xb, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach() * len(yb)
        self.correct += hits

    def reset(self) -> None:
        """Zero the epoch sums in place (a captured graph keeps writing to the same memory)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def sums(self) -> Tuple[float, float]:
        """(sum of batch loss x batch size, correct predictions) since reset(): one host sync."""
        return self.loss_sum.item(), self.correct.item()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        if not self.cuda_graphs:
            self._step(xb, yb)
            return
        if self._graph is None:
            if self._warm < self.WARMUP_STEPS:
                # Warm-up on a side stream (lazy initialisation, optimiser state, compilation), as
                # the CUDA-graph recipe requires; these are real steps of the run.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._step(xb, yb)
                torch.cuda.current_stream().wait_stream(side)
                self._warm += 1
                return
            self._static = (xb.clone(), yb.clone())
            graph = torch.cuda.CUDAGraph()
            # Capture records without running; set_to_none inside the step makes the captured
            # backward write fresh gradients (in the graph's pool) instead of accumulating.
            with torch.cuda.graph(graph):
                self._step(*self._static)
            self._graph = graph
        self._static[0].copy_(xb)
        self._static[1].copy_(yb)
        self._graph.replay()


@dataclass
class Setup:
    """Everything a run trains with, built in the order that fixes its random state."""

    device: torch.device
    ds: Dataset
    model: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator  # batch order and precise-BN batches
    step: TrainStep
    # Step-level evaluation draws its precise-BN batches from a generator of its own, so that
    # train.eval_every never changes the batches training sees.
    eval_gen: Optional[torch.Generator] = None
    lr_fn: Optional[Callable[[int], float]] = None  # global step -> learning rate (optim.schedule)
    global_step: int = 0  # SGD steps done in this run
    lr: float = float("nan")  # the rate of the last step


def set_threads(threads: Optional[int]) -> int:
    """train.threads, else as many as the CPUs free to this process right now (bnlab.threads):
    torch's default (every core) oversubscribes a shared machine, 10-20x slower measured here."""
    if not threads:
        choice = auto_threads()
        threads = choice.threads
        log.info("%s", choice.why())
    torch.set_num_threads(threads)
    try:
        # Inter-op work (torch.jit.fork) is unused in training: one pool thread, not one per core.
        torch.set_num_interop_threads(1)
    except RuntimeError:  # settable once per process, before any inter-op work
        pass
    return threads


def setup(cfg: Config, data: Optional[Dataset] = None) -> Setup:
    """Threads, device, data on the device, seeded model and optimiser, and the step function."""
    set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if cfg.train.cuda_graphs and device.type == "cuda" and cfg.bn.enabled and (
            cfg.bn.momentum is None or None in cfg.bn.shadow_momenta):
        # The cumulative average reads num_batches_tracked on the host every step: not capturable.
        raise ConfigError("train.cuda_graphs needs a fixed bn.momentum and bn.shadow_momenta "
                          "(null, the cumulative average, reads a counter on the host every step)")
    ds = (data or load_data(cfg.data, natural_shape(cfg.model))).to(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.bn, ds.shape, ds.classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = TrainStep(model, opt, device, compile=cfg.train.compile, amp=cfg.train.amp,
                     cuda_graphs=cfg.train.cuda_graphs)
    # The eval generator's seed is far from any run seed, so its batches never mirror training's.
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    steps_per_epoch = max(1, len(ds.x_train) // cfg.data.batch_size)

    def lr_fn(i: int) -> float:
        return lr_at(cfg.optim, i, steps_per_epoch, cfg.train.epochs)

    return Setup(device, ds, model, opt, gen, step, eval_gen, lr_fn)


def eval_subset(ds: Dataset, n: Optional[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation subset of step-level evaluation: n examples drawn once with `seed`
    (data.subset_seed), the same for every run and step; the whole set for n = None."""
    if n is None or n >= len(ds.x_val):
        return ds.x_val, ds.y_val
    idx = torch.randperm(len(ds.x_val), generator=torch.Generator().manual_seed(seed))[:n]
    idx = idx.sort().values.to(ds.x_val.device)
    return ds.x_val[idx], ds.y_val[idx]


def train_epoch(s: Setup, batch_size: int, desc: str = "", progress: bool = False, *,
                eval_every: int = 0, on_eval: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """One pass over the shuffled training set: train/loss, train/acc, train/lr (the rate of the
    epoch's last step) and perf/train_examples_per_s (this loop only, up to the epoch's one host
    sync; step-level evaluations excluded). Each step's rate comes from s.lr_fn (optim.schedule);
    after every `eval_every`-th SGD step of the run, on_eval(global step) runs (its time is not
    counted as training time)."""
    s.model.train()
    s.step.reset()
    t0 = time.perf_counter()
    paused = 0.0
    seen = 0
    steps = len(s.ds.x_train) // batch_size
    bar = _progress(steps, desc, progress)
    for xb, yb in train_batches(s.ds.x_train, s.ds.y_train, batch_size, s.gen):
        if s.lr_fn is not None:
            s.lr = s.lr_fn(s.global_step)
            for group in s.opt.param_groups:
                group["lr"] = s.lr
        s.step(xb, yb)
        s.global_step += 1
        seen += len(yb)
        bar.update(1)
        if on_eval is not None and eval_every > 0 and s.global_step % eval_every == 0:
            t_eval = time.perf_counter()
            on_eval(s.global_step)
            s.model.train()
            paused += time.perf_counter() - t_eval
    bar.close()
    loss_sum, correct = s.step.sums()  # waits for the device: the time below is honest on CUDA
    train_time = time.perf_counter() - t0 - paused
    out = {"train/loss": loss_sum / seen, "train/acc": correct / seen,
           "perf/train_examples_per_s": seen / train_time}
    if s.lr_fn is not None:
        out["train/lr"] = s.lr
    return out


def step_metrics(s: Setup, cfg: Config, val: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, float]:
    """The step-level evaluation: epoch_metrics on the subset `val` (precise BN from s.eval_gen),
    keys under STEP_PREFIX, plus step/lr. Buffers and flags of the model are unchanged."""
    m = epoch_metrics(s.model, s.ds, cfg, s.eval_gen, final=False, val=val)
    m["lr"] = s.lr
    return {STEP_PREFIX + k: v for k, v in m.items()}


# ----------------------------------------------------------------------------- one run

def after_epoch(epoch: int, job=None, flush=None) -> None:
    """After an epoch's metrics and checkpoint are written: bnlab.faults' named point
    `epoch_logged` (BNLAB_FAULT=kill_after_epoch:N[@J], sigint_after_epoch:N[@J],
    usr2_after_epoch:N[@J]); tests of resume also replace this function to interrupt a run in-process."""
    faults.point("epoch_logged", epoch=epoch, job=job, flush=flush)


def train(cfg: Config, tracker=None, *, data: Optional[Dataset] = None,
          extra_tags: Optional[Dict[str, str]] = None, config_text: str = "") -> Dict[str, float]:
    """Train one model as configured, evaluate every epoch, log through `tracker`.

    A failure while loading the data or building the model ends the run FAILED (preflight in cli.py
    checks the knowable first). A loss that diverges (NaN/inf or above DIVERGED_LOSS) stops the run,
    tagged diverged, with its curves so far (status FINISHED); any other error ends the run FAILED
    with the error recorded; Ctrl-C ends it KILLED.
    On CUDA the epoch metrics are written by a logging process (BackgroundTracker), in order.
    """
    # What defines the run (bookkeeping left out, see bnlab.describe); config_text has everything.
    params = describe.run_params(cfg)
    tags = {**run_tags(cfg), **describe.run_tags(cfg), **(extra_tags or {})}
    try:
        s = setup(cfg, data)
    except BaseException as e:
        # A failure at the data or device stage still leaves a FAILED run with its error, so that
        # a sweep's count, resume and the report all see it (Ctrl-C: KILLED).
        t = BackgroundTracker(tracker or NullTracker())
        t.start(params, tags, config_text)
        if isinstance(e, KeyboardInterrupt):
            t.end("KILLED", "interrupted (Ctrl-C)")
        else:
            t.end("FAILED", "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    tags[TAG + "device_used"] = device_name(s.device)  # train.device may say auto: what it became
    # On CUDA an epoch takes tens of ms and one store write several: write from a logging process.
    # On CPU an epoch takes seconds and a write is under 0.1% of it: synchronous is cheapest.
    tracker = BackgroundTracker(tracker or NullTracker(), process=s.device.type == "cuda")
    tracker.start(params, tags, config_text)
    final: Dict[str, float] = {}
    # A run taken over after a kill continues after its last complete epoch (bnlab.checkpoint).
    done, logged_step = 0, 0
    try:
        resumed = tracker.load_checkpoint()
        if resumed is not None:
            blob, logged_step = resumed
            if blob is not None:
                done, final = ckpt.restore(s, ckpt.from_bytes(blob))
            log.info("resumed after epoch %d of %d (global step %d)", done, cfg.train.epochs, s.global_step)
    except BaseException as e:
        tracker.end("FAILED", "could not resume: " + "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    on_eval = None
    if cfg.train.eval_every > 0:
        val = eval_subset(s.ds, cfg.train.eval_subset, cfg.data.subset_seed)

        def on_eval(step: int) -> None:
            if step > logged_step:  # steps logged before the kill are not logged twice
                tracker.log_epoch(step, step_metrics(s, cfg, val))
    try:
        for epoch in range(done + 1, cfg.train.epochs + 1):
            if cfg.bn.enabled and epoch == cfg.bn.freeze_at:
                # FrozenBN from here on: population statistics recomputed once (training's batches).
                bnm.freeze(s.model, precise_source(s.ds, cfg.data.batch_size, s.gen),
                           min(cfg.bn.precise_samples, len(s.ds.x_train)))
                log.info("epoch %d: BN frozen at precise statistics of %d examples", epoch, cfg.bn.precise_samples)
            m = train_epoch(s, cfg.data.batch_size, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress,
                            eval_every=cfg.train.eval_every, on_eval=on_eval)
            train_loss = m["train/loss"]
            if diverged(train_loss):
                # Curves end here; evaluating a NaN model would only add noise to the plots.
                tracker.log_epoch(epoch, m)
                tracker.set_tags({TAG + "diverged": "true", TAG + "diverged_epoch": str(epoch)})
                log.warning("loss is %s at epoch %d (divergence: non-finite or above %g): run stopped and "
                            "tagged diverged", train_loss, epoch, DIVERGED_LOSS)
                final = {**m, "diverged_epoch": epoch}
                break
            m.update(epoch_metrics(s.model, s.ds, cfg, s.gen, final=epoch == cfg.train.epochs))
            m["gap/acc"] = m["train/acc"] - m["val/acc"]
            tracker.checkpoint(epoch, m, ckpt.to_bytes(ckpt.capture(s, epoch, m)))
            final = m
            after_epoch(epoch, job=tags.get(TAG + "job"), flush=tracker.flush)
            log.info("epoch %d/%d  train/loss %.4f  train/acc %.4f  val/acc %.4f  %s  (%.0f ex/s)",
                     epoch, cfg.train.epochs, m["train/loss"], m["train/acc"], m["val/acc"],
                     f"val/acc_batch_stats {m['val/acc_batch_stats']:.4f}" if "val/acc_batch_stats" in m else "",
                     m["perf/train_examples_per_s"])
            warning = chance_warning(cfg, m["train/acc"], s.ds.y_train,
                                     len(s.ds.x_train) // cfg.data.batch_size * cfg.data.batch_size) if epoch == 1 else None
            if warning:
                log.warning("%s", warning)
                tracker.set_tags({TAG + "warning": warning})
        if "diverged_epoch" not in final:  # a NaN model is nothing to keep
            tracker.log_model(*model_artifact(s.model, cfg, s.ds))
        tracker.flush()  # a failed write is this run's error, handled below
    except KeyboardInterrupt:
        tracker.end("KILLED", "interrupted (Ctrl-C)")
        raise
    except SystemExit as e:  # a scheduler's signal handler (submitit's preemption/requeue) exits
        tracker.end("KILLED", f"stopped by the scheduler (exit {e.code}); a relaunch resumes it")
        raise
    except BaseException as e:
        try:
            tracker.end("FAILED", "".join(traceback.format_exception_only(type(e), e)).strip())
        except StoreError as end_error:
            # The store failed first: its own error says what was not written. Else the run's
            # error could not be recorded, and that is what the caller must hear about.
            if not isinstance(e, StoreError):
                raise end_error from e
        raise
    tracker.end("FINISHED")
    return final

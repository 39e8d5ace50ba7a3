"""train(cfg, tracker) -> final metrics: one run, its per-epoch evaluations, logged through the
tracker it is given. Knows nothing of Hydra or MLflow."""
from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import bn as bnm
from bnlab.config import Config, Device, config_hash, flatten, to_plain
from bnlab.data import Dataset, eval_batches, load_data, train_batches
from bnlab.models import build_model
from bnlab.tracking import TAG, NullTracker

log = logging.getLogger("bnlab")


def resolve_device(d: Device) -> torch.device:
    if d == Device.cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    if d == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d.value)


def shadow_key(m: float) -> str:
    """Metric name of a shadow momentum: val/acc_shadow/0.01 (MLflow allows letters, digits, _-.:/ and space)."""
    return f"val/acc_shadow/{m:g}"


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Dict[str, float]:
    """Loss and accuracy in eval mode with whatever statistics the BN modules are set to use.
    The train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for xb, yb in eval_batches(x, y, batch_size):
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = len(x)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def _precise_source(ds: Dataset, batch_size: int, gen: torch.Generator):
    """Endless shuffled training batches for precise BN (training batch size, as in Wu & Johnson)."""
    while True:
        yield from train_batches(ds.x_train, ds.y_train, batch_size, gen)


def epoch_metrics(model: nn.Module, ds: Dataset, cfg: Config, gen: torch.Generator,
                  final: bool) -> Dict[str, float]:
    """Every evaluation of one epoch; the model's buffers and flags are unchanged afterwards."""
    bs, ebs = cfg.data.batch_size, cfg.data.eval_batch_size
    m: Dict[str, float] = {}
    ev = evaluate(model, ds.x_val, ds.y_val, ebs)
    m["val/loss"], m["val/acc"] = ev["loss"], ev["acc"]
    if not cfg.bn.enabled:
        return m
    with bnm.batch_stats_eval(model):
        # Batches of the training size: the statistics a "test in training mode" user would get.
        m["val/acc_batch_stats"] = evaluate(model, ds.x_val, ds.y_val, bs)["acc"]
    if cfg.bn.precise_samples > 0:
        n = min(cfg.bn.precise_samples, len(ds.x_train))
        precise = bnm.precise_bn(model, _precise_source(ds, bs, gen), n)
        m["val/acc_precise_bn"] = evaluate(precise, ds.x_val, ds.y_val, ebs)["acc"]
        err = bnm.running_stats_error(model, precise)
        m["bnstats/mean_err"], m["bnstats/var_err"] = err["mean_err"], err["var_err"]
        del precise
    for k, mom in enumerate(cfg.bn.shadow_momenta):
        with bnm.use_shadow(model, k):
            m[shadow_key(mom)] = evaluate(model, ds.x_val, ds.y_val, ebs)["acc"]
    if final and cfg.train.bs1_samples > 0:
        k = min(cfg.train.bs1_samples, len(ds.x_val))
        with bnm.batch_stats_eval(model):
            # One example per batch: every BN output collapses to beta (seed 000's pitfall).
            m["val/acc_batch_stats_bs1"] = evaluate(model, ds.x_val[:k], ds.y_val[:k], 1)["acc"]
    return m


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()),
                mininterval=0.5, unit="batch")


def run_tags(cfg: Config) -> Dict[str, str]:
    return {TAG + "config_hash": config_hash(cfg), TAG + "seed": str(cfg.seed),
            TAG + "diverged": "false"}


def train(cfg: Config, tracker=None, *, data: Optional[Dataset] = None,
          extra_tags: Optional[Dict[str, str]] = None, config_text: str = "") -> Dict[str, float]:
    """Train one model as configured, evaluate every epoch, log through `tracker`.

    The data is loaded and the model built before the tracker starts a run, so bad data writes
    nothing. A NaN/inf loss stops the run, tagged diverged, with its curves so far (status
    FINISHED); any other error ends the run FAILED with the error recorded; Ctrl-C ends it KILLED.
    """
    tracker = tracker or NullTracker()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    ds = (data or load_data(cfg.data)).to(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.bn).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order and precise-BN batches
    params = flatten(to_plain(cfg))
    tracker.start(params, {**run_tags(cfg), **(extra_tags or {})}, config_text)
    final: Dict[str, float] = {}
    try:
        steps = len(ds.x_train) // cfg.data.batch_size
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen, diverged = 0, False
            bar = _progress(steps, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress)
            for xb, yb in train_batches(ds.x_train, ds.y_train, cfg.data.batch_size, gen):
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # Sums stay on the device: no host sync per step.
                loss_sum += loss.detach() * len(yb)
                correct += (out.argmax(1) == yb).sum()
                seen += len(yb)
                bar.update(1)
            bar.close()
            train_time = time.perf_counter() - t0
            train_loss = loss_sum.item() / seen
            m = {"train/loss": train_loss, "train/acc": correct.item() / seen,
                 "perf/train_examples_per_s": seen / train_time}
            if not math.isfinite(train_loss):
                diverged = True
            if diverged:
                # Curves end here; evaluating a NaN model would only add noise to the plots.
                tracker.log_epoch(epoch, m)
                tracker.set_tags({TAG + "diverged": "true", TAG + "diverged_epoch": str(epoch)})
                log.warning("loss is %s at epoch %d: run stopped and tagged diverged", train_loss, epoch)
                final = {**m, "diverged_epoch": epoch}
                break
            m.update(epoch_metrics(model, ds, cfg, gen, final=epoch == cfg.train.epochs))
            m["gap/acc"] = m["train/acc"] - m["val/acc"]
            tracker.log_epoch(epoch, m)
            final = m
            log.info("epoch %d/%d  train/loss %.4f  train/acc %.4f  val/acc %.4f  %s  (%.0f ex/s)",
                     epoch, cfg.train.epochs, m["train/loss"], m["train/acc"], m["val/acc"],
                     f"val/acc_batch_stats {m['val/acc_batch_stats']:.4f}" if "val/acc_batch_stats" in m else "",
                     m["perf/train_examples_per_s"])
    except KeyboardInterrupt:
        tracker.end("KILLED", "interrupted (Ctrl-C)")
        raise
    except BaseException as e:
        tracker.end("FAILED", "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    tracker.end("FINISHED")
    return final

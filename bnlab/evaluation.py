"""A run's evaluations: loss and accuracy with running statistics, with batch statistics, with
precise BN (recomputed population statistics) and with each shadow momentum, and the names they are
logged under. train() calls epoch_metrics once per epoch (and per eval_every steps)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import bn as bnm
from bnlab.config import Config
from bnlab.data import Dataset, eval_batches, train_batches


def precise_size_key(n: int) -> str:
    """Metric name of precise BN with n calibration examples (bn.precise_sizes)."""
    return f"val/acc_precise_bn/{n}"


def shadow_key(m: float, metric: str = "val/acc") -> str:
    """Metric name of a shadow momentum: val/acc_shadow/0.01, bnstats/mean_err_shadow/0.01
    (MLflow allows letters, digits, _-.:/ and space)."""
    return f"{metric}_shadow/{m:g}"


# Running-statistics evaluation on CPU runs the model on pieces of this many examples of each
# eval batch: activations of 2000 LeNet examples (27 MB per conv1-sized tensor) overflow the caches,
# and 256 at a time measured 2.2x faster here. Per-example outputs do not depend on the batch then.
CPU_EVAL_CHUNK = 256


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
             chunk: Optional[int] = None) -> Dict[str, float]:
    """Loss and accuracy in eval mode with whatever statistics the BN modules are set to use.
    The train/eval flag is restored afterwards. `chunk`: run the model on pieces of at most this
    many examples of each batch and join the logits (only where an example's output does not
    depend on its batch, i.e. running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for xb, yb in eval_batches(x, y, batch_size):
        if chunk is not None and len(xb) > chunk:
            out = torch.cat([model(piece) for piece in xb.split(chunk)])
        else:
            out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = len(x)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


@torch.no_grad()
def shadow_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, k: int, *,
                      chunk: Optional[int] = None) -> List[float]:
    """Accuracy with each of the k shadow statistics: what `with bn.use_shadow(model, j):
    evaluate(...)` gives for j < k, bit for bit, at less cost. The layers of a Sequential model
    before its first BN are the same for every shadow, so they run once per batch (in LeNet that
    is conv1, the dearest layer of an evaluation forward); the rest runs once per shadow."""
    children = list(model.children()) if type(model) is nn.Sequential else []
    first_bn = next((i for i, c in enumerate(children) if bnm.bn_modules(c)), 0)
    prefix, rest = nn.Sequential(*children[:first_bn]), nn.Sequential(*children[first_bn:])
    if not children:
        prefix, rest = nn.Sequential(), model
    was_training = model.training
    model.eval()
    correct = [torch.zeros((), device=x.device) for _ in range(k)]
    try:
        for xb, yb in eval_batches(x, y, batch_size):
            pieces = xb.split(chunk) if chunk is not None and len(xb) > chunk else (xb,)
            shared = [prefix(p) for p in pieces]
            for j in range(k):
                with bnm.use_shadow(model, j):
                    out = torch.cat([rest(h) for h in shared]) if len(shared) > 1 else rest(shared[0])
                correct[j] += (out.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    return [c.item() / len(x) for c in correct]


def precise_source(ds: Dataset, batch_size: int, gen: torch.Generator):
    """Endless shuffled training batches for precise BN (training batch size, as in Wu & Johnson)."""
    while True:
        yield from train_batches(ds.x_train, ds.y_train, batch_size, gen)


def epoch_metrics(model: nn.Module, ds: Dataset, cfg: Config, gen: torch.Generator,
                  final: bool, val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, float]:
    """Every evaluation of one epoch; the model's buffers and flags are unchanged afterwards.
    `val` (x, y) replaces the validation set (step-level evaluation on a subset); `gen` draws the
    precise-BN batches. With `final`, also val/acc_batch_stats_bs1 and bn.precise_sizes."""
    bs, ebs = cfg.data.batch_size, cfg.data.eval_batch_size
    x_val, y_val = val if val is not None else (ds.x_val, ds.y_val)
    # Passes with running statistics: the same result whatever the pieces (see CPU_EVAL_CHUNK).
    chunk = CPU_EVAL_CHUNK if x_val.device.type == "cpu" else None
    m: Dict[str, float] = {}
    ev = evaluate(model, x_val, y_val, ebs, chunk=chunk)
    m["val/loss"], m["val/acc"] = ev["loss"], ev["acc"]
    if not cfg.bn.enabled:
        return m
    with bnm.batch_stats_eval(model):
        # Batches of the training size: the statistics a "test in training mode" user would get.
        m["val/acc_batch_stats"] = evaluate(model, x_val, y_val, bs)["acc"]
    if cfg.bn.precise_samples > 0:
        n = min(cfg.bn.precise_samples, len(ds.x_train))
        precise = bnm.precise_bn(model, precise_source(ds, bs, gen), n)
        m["val/acc_precise_bn"] = evaluate(precise, x_val, y_val, ebs, chunk=chunk)["acc"]
        err = bnm.running_stats_error(model, precise)
        m["bnstats/mean_err"], m["bnstats/var_err"] = err["mean_err"], err["var_err"]
        # The same distance for each shadow average: the running-statistics figure gets the whole
        # momentum axis from one run (tiny per-channel vectors: negligible cost).
        for k, mom in enumerate(cfg.bn.shadow_momenta):
            with bnm.use_shadow(model, k):
                err = bnm.running_stats_error(model, precise)
            m[shadow_key(mom, "bnstats/mean_err")] = err["mean_err"]
            m[shadow_key(mom, "bnstats/var_err")] = err["var_err"]
        del precise
    if cfg.bn.shadow_momenta:
        accs = shadow_accuracies(model, x_val, y_val, ebs, len(cfg.bn.shadow_momenta), chunk=chunk)
        for mom, acc in zip(cfg.bn.shadow_momenta, accs):
            m[shadow_key(mom)] = acc
    if final and cfg.bn.precise_sizes:
        for size in cfg.bn.precise_sizes:
            # A fresh draw of training batches per size; the copy is discarded after one pass.
            precise = bnm.precise_bn(model, precise_source(ds, bs, gen), min(size, len(ds.x_train)))
            m[precise_size_key(size)] = evaluate(precise, x_val, y_val, ebs, chunk=chunk)["acc"]
            del precise
    if final and cfg.train.bs1_samples > 0:
        k = min(cfg.train.bs1_samples, len(x_val))
        with bnm.batch_stats_eval(model):
            # One example per batch: every BN output collapses to beta (seed 000's pitfall).
            m["val/acc_batch_stats_bs1"] = evaluate(model, x_val[:k], y_val[:k], 1)["acc"]
    return m

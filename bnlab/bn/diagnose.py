"""diagnose: a trained model's BN statistics judged without training it: per-layer distance of the
running to the population statistics, loss/accuracy with running, batch and precise statistics,
and a verdict in words. The model, its buffers and its mode are left as they were."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.bn.modes import _named_bn, _running_mean_var, batch_stats_eval
from bnlab.bn.module import BatchNorm
from bnlab.bn.precise import precise_bn


@dataclass
class Diagnosis:
    """layers: one row per BN layer (layer, kind, channels, momentum, update_stats, batches_tracked,
    mean_err, var_err: relative L2 distance of running mean/variance to the population's).
    evals: index running/batch/precise, columns loss, acc (acc NaN unless outputs are class scores).
    verdict: a sentence or two; num_samples: training examples behind the population statistics."""

    layers: "object"  # pandas.DataFrame (pandas is imported only when diagnose runs)
    evals: "object"
    verdict: str
    num_samples: int

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 120, "display.max_columns", 20, "display.max_rows", 200):
            layers = self.layers.to_string(index=False, float_format=lambda v: f"{v:.4f}")
            evals = self.evals.to_string(float_format=lambda v: f"{v:.4f}")
        return (f"BN layers (running vs population statistics from {self.num_samples} training examples):\n"
                f"{layers}\n\nvalidation with each kind of statistics:\n{evals}\n\nverdict: {self.verdict}")


def _rel(v: Tensor, ref: Tensor) -> float:
    # Same distance as precise.running_stats_error, per layer; float64 on the CPU (tiny vectors).
    v, ref = v.detach().cpu().double(), ref.detach().cpu().double()
    return (torch.linalg.vector_norm(v - ref) / (torch.linalg.vector_norm(ref) + 1e-12)).item()


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _split(item) -> Tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"val_batches must yield (x, y) pairs, got {type(item).__name__}")
    return item[0], item[1]


@torch.no_grad()
def _evaluate(model: nn.Module, batches: List, loss_fn: Callable, device: torch.device) -> Tuple[float, float]:
    """(mean loss per example, accuracy) in eval mode; the train/eval flags are restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    loss_sum, correct, n, classify = 0.0, 0, 0, True
    try:
        for item in batches:
            x, y = _split(item)
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            if out.dim() == 2 and not y.is_floating_point() and y.dim() == 1:
                correct += int((out.argmax(1) == y).sum())
            else:
                classify = False
            n += len(y)
    finally:
        for m, mode in modes:
            m.training = mode
    if n == 0:
        raise ValueError("val_batches gave no examples")
    return loss_sum / n, (correct / n if classify else float("nan"))


def _verdict(acc: dict, layers, never_updated: List[str], tol: float) -> str:
    run, batch, prec = acc["running"], acc["batch"], acc["precise"]
    pts = lambda a: 100.0 * a  # noqa: E731 - accuracy in points
    gain = pts(prec) - pts(run)
    worst = layers.loc[layers["mean_err"].add(layers["var_err"]).idxmax(), "layer"]
    if gain != gain:  # NaN: not a classifier; judge by the distances alone
        stale = float(layers["var_err"].max()) > 0.5 or float(layers["mean_err"].max()) > 0.5
        words = ["running statistics are stale (largest distance in layer {worst!r})".format(worst=worst)
                 if stale else "running statistics are close to the population statistics"]
    elif gain >= tol:
        words = [f"running statistics are stale; precise BN recovers {gain:.1f} points "
                 f"({pts(run):.1f}% -> {pts(prec):.1f}%); worst layer {worst!r}"]
        if never_updated:
            words.append(f"{len(never_updated)} of {len(layers)} BN layers never updated their running "
                         f"statistics (missing update ops / update_stats=False): enable the updates, "
                         f"then recalibrate")
        else:
            words.append("recalibrate (bnlab.bn.precise_bn) or raise the momentum")
    elif -gain >= tol:
        words = [f"precise BN is {-gain:.1f} points worse than the running statistics ({pts(run):.1f}% vs "
                 f"{pts(prec):.1f}%): too few calibration samples, or training batches unlike the "
                 f"validation data"]
    else:
        words = [f"healthy: running statistics are within {abs(gain):.1f} points of precise BN "
                 f"({pts(run):.1f}% vs {pts(prec):.1f}%); largest distance to the population: mean "
                 f"{layers['mean_err'].max():.3f}, var {layers['var_err'].max():.3f}"]
    if gain == gain and pts(prec) - pts(batch) >= tol:
        words.append(f"evaluating with batch statistics at this batch size costs {pts(prec) - pts(batch):.1f} "
                     f"points: keep the model in eval mode at test time")
    return "; ".join(words)


def diagnose(model: nn.Module, train_batches: Iterable, val_batches: Iterable, num_samples: int = 10000, *,
             loss_fn: Callable = F.cross_entropy, tolerance_points: float = 2.0) -> Diagnosis:
    """Diagnose the BN statistics of a trained `model` without training it.

    train_batches: items x or (x, y) from the training distribution (e.g. a shuffled DataLoader);
    the first num_samples examples give each BN's population statistics (precise BN, on a copy).
    val_batches: (x, y) items (iterated three times; an iterator is materialised once); batch
    statistics are those of these batches, so their size matters. Batches are moved to the model's
    device. loss_fn(outputs, y) -> mean loss. Works on any model with torch or bnlab BN layers.
    The verdict calls the statistics stale when precise BN beats the running statistics by at
    least `tolerance_points` accuracy points. The model's buffers, parameters and modes are unchanged.
    """
    import pandas as pd

    named = _named_bn(model)
    if not named:
        raise ValueError("model must contain at least one BatchNorm module, found none")
    device = _device(model)
    if iter(val_batches) is val_batches:  # a one-shot iterator: keep its batches for three passes
        val_batches = list(val_batches)

    pulled = [0]

    def to_device(items):
        for item in items:
            x = item[0] if isinstance(item, (tuple, list)) else item
            pulled[0] += len(x) if isinstance(x, Tensor) and x.dim() else 0
            yield x.to(device) if isinstance(x, Tensor) else x

    precise = precise_bn(model, to_device(train_batches), num_samples)
    seen = min(pulled[0], num_samples)
    rows, never = [], []
    for (name, m), (_, p) in zip(named, _named_bn(precise)):
        mean, var = _running_mean_var(name, m)
        pmean, pvar = _running_mean_var(name, p)
        count = int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
        frozen = isinstance(m, BatchNorm) and not m.update_stats
        if frozen or count == 0:
            never.append(name)
        rows.append({"layer": name, "kind": type(m).__name__, "channels": mean.numel(),
                     "momentum": m.momentum, "update_stats": not frozen, "batches_tracked": count,
                     "mean_err": _rel(mean, pmean), "var_err": _rel(var, pvar)})
    layers = pd.DataFrame(rows)

    evals = {}
    evals["running"] = _evaluate(model, val_batches, loss_fn, device)
    with batch_stats_eval(model):
        evals["batch"] = _evaluate(model, val_batches, loss_fn, device)
    evals["precise"] = _evaluate(precise, val_batches, loss_fn, device)
    del precise
    frame = pd.DataFrame.from_dict(evals, orient="index", columns=["loss", "acc"])
    frame.index.name = "statistics"
    verdict = _verdict({k: v[1] for k, v in evals.items()}, layers, never, tolerance_points)
    return Diagnosis(layers=layers, evals=frame, verdict=verdict, num_samples=seen)

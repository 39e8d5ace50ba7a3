"""Precise BN (Wu & Johnson 2021, sec. 3): population statistics from N training samples,
weighted by batch size, and the distance of running statistics to them."""
from __future__ import annotations

import copy
import numbers
import warnings
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from bnlab.bn.functional import _channel_shape, _check_bool, _reduce_dims, _values_per_channel
from bnlab.bn.module import BatchNorm
from bnlab.bn.modes import _named_bn, _running_mean_var


class _ChannelMoments:
    """Exact per-channel count, mean and sum of squared deviations (M2) over every value seen,
    merged batch by batch with the pairwise update of Chan, Golub & LeVeque (1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        dims = _reduce_dims(x)
        # Accumulate in float64 (MPS has none): M2 of many batches is a long sum.
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        xd = x.detach().to(acc)
        n_b = _values_per_channel(xd)
        if n_b == 0:
            return
        mean_b = xd.mean(dims)
        m2_b = (xd - mean_b.reshape(_channel_shape(xd))).square().sum(dims)
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        # Law of total variance in merge form: M2 = M2_a + M2_b + delta^2 * n_a * n_b / n; equals
        # sum over batches of n_b * (biased var_b + mean_b^2) - n * mean^2 without its cancellation.
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n


def _calibration_inputs(batches: Iterable, num_samples: int) -> Iterator[Tensor]:
    """Inputs x from `batches` (tensor or (x, y, ...) items), the last one truncated so that exactly
    num_samples examples come out; stops pulling items once num_samples are reached."""
    seen = 0
    for item in batches:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"batches must yield tensors or (x, y) tuples with a batch dim, "
                             f"got {type(x).__name__}")
        need = num_samples - seen
        if x.shape[0] > need:
            x = x[:need]
        if x.shape[0] == 0:
            continue
        seen += x.shape[0]
        yield x
        if seen >= num_samples:
            return


def _merge_singletons(inputs: Iterator[Tensor]) -> Iterator[Tensor]:
    # A training-mode forward of one example fails on dense BN (one value per channel), so a
    # batch of one is joined to its neighbour; every example is still seen exactly once.
    pending: Optional[Tensor] = None
    for x in inputs:
        if pending is not None and (x.shape[0] == 1 or pending.shape[0] == 1):
            pending = torch.cat([pending, x])
            continue
        if pending is not None:
            yield pending
        pending = x
    if pending is not None:
        yield pending


def precise_bn(model: nn.Module, batches: Iterable, num_samples: int, *, inplace: bool = False) -> nn.Module:
    """Precise-BN: replace every BN's running statistics by the exact population statistics of its
    inputs over num_samples training examples.

    Sources: "BN: the untold story" (Method TWO); Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm", sec. 3; fvcore.nn.precise_bn (which averages per-batch statistics with equal weights;
    here every value is weighted equally, i.e. batches by their size).
    With weights frozen (torch.no_grad) the model runs in train mode over `batches` (items: x or
    (x, y)); the last batch is truncated to reach exactly num_samples (a batch of one example is
    joined to its neighbour, since dense BN cannot run on one example in train mode). Each BN's
    inputs are collected by a forward pre-hook; then running_mean = mean of all values per channel
    and running var = their exact variance (law of total variance), divided by count - 1 where the
    BN stores unbiased variances (torch BN, running_var="unbiased") and by count otherwise; track="std"
    stores its square root. All other BN buffers (num_batches_tracked, shadows) keep their values.
    Works on a deep copy unless inplace=True (the input model is then untouched); returns the model
    in eval mode. If `batches` runs out early, what was seen is used.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    _check_bool("inplace", inplace)
    target = model if inplace else copy.deepcopy(model)
    named = _named_bn(target)
    if not named:
        raise ValueError("model must contain at least one BatchNorm module, found none")
    for name, m in named:
        _running_mean_var(name, m)  # raises for torch BN without running statistics

    moments = [_ChannelMoments() for _ in named]
    # Every BN buffer is restored after the calibration passes; only the running mean/var(std) change.
    saved_buffers = [{b: t.clone() for b, t in m.named_buffers(recurse=False)} for _, m in named]
    saved_modes = [(m, m.training) for m in target.modules()]

    def make_hook(acc: _ChannelMoments):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            acc.add(x)
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(acc), with_kwargs=True)
             for (_, m), acc in zip(named, moments)]
    seen = 0
    ok = False
    try:
        target.train()
        with torch.no_grad():
            for x in _merge_singletons(_calibration_inputs(batches, num_samples)):
                if x.shape[0] < 2:
                    raise ValueError(f"batches must give at least 2 examples, got {x.shape[0]}")
                target(x)
                seen += x.shape[0]
        if seen == 0:
            raise ValueError("batches must give at least one example, got none")
        ok = True
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for (_, m), buffers in zip(named, saved_buffers):
                for b, t in buffers.items():
                    getattr(m, b).copy_(t)
        if not ok:
            for m, mode in saved_modes:
                m.training = mode

    with torch.no_grad():
        for (name, m), acc in zip(named, moments):
            if acc.count < 2:
                warnings.warn(f"precise_bn: BatchNorm {name!r} saw {acc.count} values per channel; "
                              f"its running statistics are left unchanged", RuntimeWarning, stacklevel=2)
                continue
            unbiased = m.running_var_mode == "unbiased" if isinstance(m, BatchNorm) else True
            var = acc.m2 / (acc.count - 1 if unbiased else acc.count)
            m.running_mean.copy_(acc.mean)
            if isinstance(m, BatchNorm) and m.track == "std":
                m.running_std.copy_(var.sqrt())
            else:
                m.running_var.copy_(var)
    target.eval()
    return target


def running_stats_error(model: nn.Module, reference_model: nn.Module) -> Dict[str, float]:
    """Relative distance of each BN's running statistics from a reference (e.g. the precise-BN copy).

    BN modules are paired in module order (both models need the same number). For layer l,
    mean_err_l = ||rm_l - rm_ref_l||_2 / (||rm_ref_l||_2 + 1e-12) and likewise var_err_l with the
    running variances (running_std**2 for track="std"; stored values as they are, whatever the
    biased/unbiased convention). Returns {"mean_err": mean over layers, "var_err": mean over layers}.
    """
    a, b = _named_bn(model), _named_bn(reference_model)
    if not a or len(a) != len(b):
        raise ValueError(f"model and reference_model must have the same number (>= 1) of BatchNorm "
                         f"modules, got {len(a)} and {len(b)}")
    mean_errs, var_errs = [], []
    for (na, ma), (nb, mb) in zip(a, b):
        mean, var = _running_mean_var(na, ma)
        mean_ref, var_ref = _running_mean_var(nb, mb)
        if mean.shape != mean_ref.shape:
            raise ValueError(f"reference_model's BatchNorm {nb!r} has {mean_ref.numel()} channels, "
                             f"model's {na!r} has {mean.numel()}")

        def rel(v: Tensor, ref: Tensor) -> float:
            # On CPU in float64: tiny (C,) vectors, and MPS has no float64.
            v, ref = v.detach().cpu().double(), ref.detach().cpu().double()
            return (torch.linalg.vector_norm(v - ref) / (torch.linalg.vector_norm(ref) + 1e-12)).item()

        mean_errs.append(rel(mean, mean_ref))
        var_errs.append(rel(var, var_ref))
    return {"mean_err": sum(mean_errs) / len(mean_errs), "var_err": sum(var_errs) / len(var_errs)}

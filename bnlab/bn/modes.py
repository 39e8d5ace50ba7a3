"""Whole-model helpers: find the BN modules of any model, switch their update of running statistics,
evaluate with batch statistics or with a shadow average (restored on exit)."""
from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.bn.functional import _HALF_DTYPES, _check_bool, batch_stats, normalize
from bnlab.bn.module import BatchNorm

# ----------------------------------------------------------------------------- model helpers

def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (BatchNorm, _BatchNorm))


def _named_bn(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name or "<model>", m) for name, m in model.named_modules() if _is_bn(m)]


def bn_modules(model: nn.Module) -> List[nn.Module]:
    """Every bnlab BatchNorm and torch.nn BatchNorm (_BatchNorm) module of `model`, in module order."""
    return [m for _, m in _named_bn(model)]


def _running_mean_var(name: str, m: nn.Module) -> Tuple[Tensor, Tensor]:
    if isinstance(m, BatchNorm):
        return m.running_stats()
    if m.running_mean is None or m.running_var is None:
        raise ValueError(f"model's BatchNorm {name!r} has track_running_stats=False: no running statistics")
    return m.running_mean, m.running_var


def set_update_stats(model: nn.Module, flag: bool) -> None:
    """Set update_stats on every bnlab BatchNorm of `model` (False = TensorFlow's missing update ops)."""
    _check_bool("flag", flag)
    named = _named_bn(model)
    foreign = [name for name, m in named if not isinstance(m, BatchNorm)]
    if foreign:
        raise ValueError(f"model must contain only bnlab BatchNorm modules for set_update_stats, "
                         f"got torch BatchNorm at {foreign}")
    for _, m in named:
        m.update_stats = flag


def _batch_stats_hook(module: nn.Module, args, output):
    # Forward hook for torch BatchNorm: in evaluation replace its output by batch-statistics
    # normalisation (never passes buffers, so nothing is updated).
    if module.training:
        return None
    x = args[0]
    xc = x.float() if x.dtype in _HALF_DTYPES else x
    w = None if module.weight is None else module.weight.to(xc.dtype)
    b = None if module.bias is None else module.bias.to(xc.dtype)
    mean, var = batch_stats(xc)
    return normalize(xc, mean, var, w, b, module.eps).to(x.dtype)


@contextlib.contextmanager
def batch_stats_eval(model: nn.Module) -> Iterator[nn.Module]:
    """For the duration, every BN of `model` evaluates with the batch's own statistics.

    bnlab modules get eval_stats="batch" (previous value restored on exit, even on exception);
    torch BatchNorm modules get a temporary forward hook. No buffer changes in evaluation. Training
    mode inside the context behaves as usual.
    """
    named = _named_bn(model)
    saved: List[Tuple[BatchNorm, str]] = []
    hooks = []
    try:
        for _, m in named:
            if isinstance(m, BatchNorm):
                saved.append((m, m.eval_stats))
                m.eval_stats = "batch"
            else:
                hooks.append(m.register_forward_hook(_batch_stats_hook))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for m, value in reversed(saved):
            m.eval_stats = value


@contextlib.contextmanager
def use_shadow(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """For the duration, every BN of `model` holds shadow statistics k in its running buffers,
    so evaluation uses them (and running_stats_error etc. see them).

    The running buffers are copied aside, overwritten with shadow k and restored bit-exactly on
    exit, even on exception. Every BN must be a bnlab BatchNorm with more than k shadow momenta.
    Training inside the context raises RuntimeError (the update would go to the swapped buffers).
    """
    named = _named_bn(model)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not named:
        raise ValueError("model must contain BatchNorm modules with shadow_momenta, found none")
    lacking = [name for name, m in named if not isinstance(m, BatchNorm) or len(m.shadow_momenta) <= k]
    if lacking:
        raise ValueError(f"k must be < the number of shadow_momenta of every BatchNorm, got k={k}; "
                         f"modules without shadow {k}: {lacking}")
    swapped: List[Tuple[BatchNorm, tuple]] = []
    try:
        for _, m in named:
            swapped.append((m, m._swap_in_shadow(int(k))))
        yield model
    finally:
        # Reverse order, so a module listed twice (shared) gets its original buffers back.
        for m, saved in reversed(swapped):
            m._swap_out_shadow(saved)

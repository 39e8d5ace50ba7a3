"""convert_bn: every torch.nn BatchNorm and bnlab BatchNorm of any model becomes a bnlab BatchNorm with
the given options (or, to="torch", a torch BatchNorm where the variant allows), parameters and
buffers carried over, so that outputs and gradients are unchanged."""
from __future__ import annotations

import copy
import inspect
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter

from bnlab.bn.functional import momentum_from_decay
from bnlab.bn.module import BatchNorm, BatchNorm1d, BatchNorm2d

# Options of bnlab's BatchNorm that a conversion may set: its keyword arguments (so a variant added
# to the module is accepted here too), minus the shape and affine, which the old layer fixes.
_BNLAB_OPTIONS = tuple(n for n, p in inspect.signature(BatchNorm.__init__).parameters.items()
                       if p.kind == p.KEYWORD_ONLY and n != "affine")
# TF convention for momentum; evaluation statistics; learned (True) or fixed (False) gamma and beta.
_EXTRA_OPTIONS = ("decay", "eval_stats", "affine")
_TORCH_OPTIONS = ("momentum", "decay", "eps")


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (BatchNorm, _BatchNorm))


def _reference(old: nn.Module) -> Tensor:
    """A floating tensor of the old layer: the new one takes its dtype and device."""
    for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return torch.zeros(())


def _old_stats(old: nn.Module):
    """(running mean, running variance, num_batches_tracked) of the old layer, or Nones."""
    if isinstance(old, BatchNorm):
        mean, var = old.running_stats()
        return mean, var, old.num_batches_tracked
    if old.running_mean is None:
        return None, None, None
    return old.running_mean, old.running_var, old.num_batches_tracked


def _bnlab_from(old: nn.Module, options: Dict) -> BatchNorm:
    if isinstance(old, BatchNorm):
        cls = type(old) if type(old) in (BatchNorm, BatchNorm1d, BatchNorm2d) else BatchNorm
        base = {"momentum": old.momentum, "eps": old.eps, "running_var": old.running_var_mode,
                "track": old.track, "update_stats": old.update_stats, "impl": old.impl,
                "shadow_momenta": old.shadow_momenta, "eval_stats": old.eval_stats}
        # Any option a newer module has (read back under the same name) is kept as well.
        for name in _BNLAB_OPTIONS:
            if name not in base and hasattr(old, name):
                base[name] = getattr(old, name)
    else:
        cls = (BatchNorm1d if isinstance(old, nn.BatchNorm1d) else
               BatchNorm2d if isinstance(old, nn.BatchNorm2d) else BatchNorm)
        # track_running_stats=False: torch normalises with batch statistics in train and eval and
        # keeps no buffers; the bnlab equivalent never updates and evaluates with batch statistics.
        tracks = old.running_mean is not None
        base = {"momentum": old.momentum, "eps": old.eps, "update_stats": tracks,
                "eval_stats": "running" if tracks else "batch"}
    base.update(options)
    eval_stats = base.pop("eval_stats", "running")
    affine = base.pop("affine", old.affine)
    new = cls(old.num_features, affine=affine, **base)
    new.eval_stats = eval_stats
    ref = _reference(old)
    new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        mean, var, count = _old_stats(old)
        if mean is not None:
            # Stored values are carried as they are: a running variance does not record the batch
            # size it was averaged with, so an unbiased one cannot be made biased exactly (or back).
            new.running_mean.copy_(mean)
            if new.track == "std":
                new.running_std.copy_(var.clamp_min(0).sqrt())
            else:
                new.running_var.copy_(var)
            new.num_batches_tracked.copy_(count)
        if new.shadow_momenta:
            same = (isinstance(old, BatchNorm) and old.shadow_momenta == new.shadow_momenta
                    and old.track == new.track)
            if same:
                new.shadow_mean.copy_(old.shadow_mean)
                getattr(new, new._shadow_spread_name).copy_(getattr(old, old._shadow_spread_name))
            else:
                # New shadows start from the carried running statistics, not from 0 and 1: a trained
                # model's shadows then follow its statistics from here on.
                new.shadow_mean.copy_(new.running_mean.expand_as(new.shadow_mean))
                spread = getattr(new, new._spread_name)
                getattr(new, new._shadow_spread_name).copy_(spread.expand_as(new.shadow_mean))
    new._prime_shadow_weights()
    return new


def _torch_from(old: nn.Module, options: Dict) -> nn.Module:
    name = type(old).__name__
    if isinstance(old, BatchNorm):
        # (option, its value here, the value torch can express)
        checks = (("running_var", old.running_var_mode, "unbiased"), ("track", old.track, "var"),
                  ("shadow_momenta", old.shadow_momenta, ()), ("update_stats", old.update_stats, True),
                  ("eval_stats", old.eval_stats, "running"))
        for key, value, ok in checks:
            if value != ok:
                raise ValueError(f"to='torch' needs {key}={ok!r} (torch has no other), got {key}={value!r} "
                                 f"in a {name}")
        if type(old) not in (BatchNorm1d, BatchNorm2d):
            raise ValueError(f"to='torch' converts BatchNorm1d and BatchNorm2d; the generic {name} has no "
                             f"fixed input rank")
    cls = nn.BatchNorm1d if isinstance(old, (BatchNorm1d, nn.BatchNorm1d)) else (
        nn.BatchNorm2d if isinstance(old, (BatchNorm2d, nn.BatchNorm2d)) else type(old))
    tracks = isinstance(old, BatchNorm) or old.running_mean is not None
    kw = {"momentum": old.momentum, "eps": old.eps, **options}
    ref = _reference(old)
    new = cls(old.num_features, eps=kw["eps"], momentum=kw["momentum"], affine=old.affine,
              track_running_stats=tracks, device=ref.device, dtype=ref.dtype)
    mean, var, count = _old_stats(old)
    if mean is not None:
        with torch.no_grad():
            new.running_mean.copy_(mean)
            new.running_var.copy_(var)
            new.num_batches_tracked.copy_(count)
    return new


def convert_bn(model: nn.Module, *, to: str = "bnlab", inplace: bool = False, **bn_options) -> nn.Module:
    """Replace every torch.nn BatchNorm (1d/2d/3d, also SyncBatchNorm) and bnlab BatchNorm of `model`
    by a bnlab BatchNorm configured with `bn_options` (momentum or decay, eps, running_var, track,
    update_stats, impl, shadow_momenta, ghost_batch_size, eval_stats, affine...; the rest taken from
    the old layer; affine=False only over gamma/beta still at 1 and 0, affine=True over a layer
    without them adds gamma = 1, beta = 0), or with
    to="torch" by torch.nn.BatchNorm1d/2d (options: momentum or decay, eps) where the variant allows.

    The new layer uses the same weight and bias Parameters (an optimiser built before keeps working
    with inplace=True) and copies of the running mean, variance and batch count, on the same device
    and dtype, in the same train/eval mode: outputs and gradients are unchanged. A BN shared by
    several parents becomes one shared new layer; a model that is itself a BN is returned converted.
    New shadow averages start from the running statistics. Works on a deep copy unless inplace=True.
    Layers held outside the module tree (plain lists, closures) are not seen; hooks are not carried.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if to not in ("bnlab", "torch"):
        raise ValueError(f"to must be 'bnlab' or 'torch', got {to!r}")
    allowed = _BNLAB_OPTIONS + _EXTRA_OPTIONS if to == "bnlab" else _TORCH_OPTIONS
    unknown = sorted(set(bn_options) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]} is not an option of convert_bn(to={to!r}); allowed: {', '.join(allowed)}")
    options = dict(bn_options)
    if "decay" in options:
        if "momentum" in options:
            raise ValueError("set momentum or decay, not both")
        decay = options.pop("decay")
        options["momentum"] = None if decay is None else momentum_from_decay(decay)

    target = model if inplace else copy.deepcopy(model)
    memo: Dict[int, nn.Module] = {}

    def convert_one(old: nn.Module) -> nn.Module:
        new: Optional[nn.Module] = memo.get(id(old))
        if new is not None:
            return new
        if any(isinstance(p, UninitializedParameter) for p in old.parameters(recurse=False)):
            raise ValueError(f"a lazy {type(old).__name__} must see one batch before conversion")
        new = _bnlab_from(old, options) if to == "bnlab" else _torch_from(old, options)
        if old.affine and not new.affine:
            # Fixed gamma = 1, beta = 0 replace the old ones: exact only while those are still there.
            with torch.no_grad():
                if not (bool((old.weight == 1).all()) and bool((old.bias == 0).all())):
                    raise ValueError(f"affine=False would drop the gamma/beta of a {type(old).__name__} that "
                                     f"are no longer 1 and 0")
        elif old.affine:
            # The same Parameter objects: values, gradients and optimiser state stay attached.
            new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        memo[id(old)] = new
        return new

    if _is_bn(target):
        return convert_one(target)
    for parent in list(target.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and _is_bn(child):
                parent._modules[name] = convert_one(child)
    return target

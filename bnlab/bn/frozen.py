"""FrozenBN (Wu & Johnson 2021, sec. 4): from some point of training on, every BN normalises with
fixed population statistics, recomputed once by precise BN, in training as in evaluation."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from bnlab.bn.modes import _named_bn
from bnlab.bn.module import BatchNorm
from bnlab.bn.precise import precise_bn


def freeze(model: nn.Module, batches: Iterable, num_samples: int) -> nn.Module:
    """Recompute every BN's running statistics by precise BN over num_samples examples of `batches`
    (in place), then freeze them: training mode normalises with those statistics and updates no
    buffer (shadows included) until unfreeze. The train/eval flags of the model are kept.
    Every BN must be a bnlab BatchNorm."""
    named = _named_bn(model)
    foreign = [name for name, m in named if not isinstance(m, BatchNorm)]
    if foreign or not named:
        raise ValueError(f"model must contain bnlab BatchNorm modules only for freeze, got "
                         f"{'none' if not named else 'torch BatchNorm at ' + str(foreign)}")
    modes = [(m, m.training) for m in model.modules()]
    # Precise BN first, while the modules still normalise with batch statistics in training mode.
    precise_bn(model, batches, num_samples, inplace=True)
    for m, mode in modes:
        m.training = mode
    for _, m in named:
        m.frozen = True
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Back to ordinary BN: batch statistics in training, running averages updated."""
    for m in model.modules():
        if isinstance(m, BatchNorm):
            m.frozen = False
    return model


def is_frozen(model: nn.Module) -> bool:
    return any(getattr(m, "frozen", False) for m in model.modules() if isinstance(m, BatchNorm))

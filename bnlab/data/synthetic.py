"""A deterministic synthetic image set of any shape: ten noisy class prototypes, learnable in one epoch."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from bnlab.data.base import Dataset


def make_synthetic(n_train: int, n_val: int, seed: int = 1234,
                   shape: Sequence[int] = (1, 28, 28)) -> Dataset:
    """Ten classes, each a fixed random prototype of `shape` plus pixel noise: learnable in one epoch,
    deterministic for a given seed, and independent of the run's seed."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(d) for d in shape)
    protos = torch.rand(10, *shape, generator=g)

    def draw(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (0.6 * protos[y] + 0.4 * torch.rand(n, *shape, generator=g)).clamp_(0, 1)
        return x, y

    xt, yt = draw(n_train)
    xv, yv = draw(n_val)
    return Dataset(xt, yt, xv, yv, source="synthetic")

"""The device-resident batch iterators: tensors on the training device sliced by a fresh permutation
(training) or in order (evaluation)."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch


def train_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches sliced from device-resident tensors; the last partial
    batch is dropped, so a BN layer never sees a batch smaller than batch_size."""
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    for i in range(len(x) // batch_size):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield x[idx], y[idx]


def eval_batches(x: torch.Tensor, y: torch.Tensor,
                 batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in order, the last one partial (nothing is dropped at test time)."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]

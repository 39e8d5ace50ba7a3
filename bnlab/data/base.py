"""What every dataset loader returns (Dataset) and raises (DataError)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


class DataError(ValueError):
    """The dataset is missing, corrupt or truncated; the message says which file and how to fix it."""


@dataclass
class Dataset:
    """Examples x (N, *shape) float32 and labels y (N,) int64 0..classes-1, for train and validation.
    For Fashion-MNIST validation is its 10k test split, as in Dive into Deep Learning; likewise CIFAR-10."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str
    classes: int = 10

    @property
    def shape(self) -> Tuple[int, ...]:
        """The shape of one example, e.g. (3, 32, 32): what the model is built for."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)),
                       source=self.source, classes=self.classes)

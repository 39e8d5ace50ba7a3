"""Datasets, one per file (fashion_mnist, cifar10, tensors, synthetic), the Dataset they return, and
the device-resident batch iterators. `load_data(cfg)` is the registry keyed by data.name;
`from bnlab.data import ...` keeps every name it had when this was one module."""
from __future__ import annotations

import urllib.request  # noqa: F401 - tests patch bnlab.data.urllib.request.urlopen (module-global)
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from bnlab.config import DataConfig, DataName
from bnlab.data.base import DataError, Dataset
from bnlab.data.batches import eval_batches, train_batches
from bnlab.data.cifar10 import load_cifar10, locate_cifar10
from bnlab.data.fashion_mnist import (
    CLASSES, DEBIAN_ROOT, DOWNLOAD_URL, EXPECTED_COUNTS, FILES, HOW_TO_GET, cache_dir, load_fashion_mnist,
    locate_fashion_mnist, read_idx,
)
from bnlab.data.synthetic import make_synthetic
from bnlab.data.tensors import load_tensors

__all__ = ["DataError", "Dataset", "load_data", "train_batches", "eval_batches", "make_synthetic",
           "load_fashion_mnist", "locate_fashion_mnist", "read_idx", "load_cifar10", "locate_cifar10",
           "load_tensors", "LOADERS", "CLASSES", "DEBIAN_ROOT", "DOWNLOAD_URL", "EXPECTED_COUNTS", "FILES",
           "HOW_TO_GET", "cache_dir"]

# The shape of one synthetic example when data.synthetic_shape is null and no model says otherwise.
DEFAULT_SHAPE = (1, 28, 28)

# data.name -> loader(cfg, shape the model needs); the built-in datasets.
LOADERS: Dict[DataName, Callable[[DataConfig, Sequence[int]], Dataset]] = {
    DataName.fashion_mnist: lambda cfg, shape: load_fashion_mnist(cfg.root),
    DataName.cifar10: lambda cfg, shape: load_cifar10(cfg.root),
    DataName.tensors: lambda cfg, shape: load_tensors(cfg.path),
    DataName.synthetic: lambda cfg, shape: make_synthetic(
        cfg.synthetic_train, cfg.synthetic_val, shape=cfg.synthetic_shape or shape),
}

# data.name -> how run descriptions name the dataset (bnlab.describe.run_description).
TITLES: Dict[DataName, Callable[[DataConfig], str]] = {
    DataName.fashion_mnist: lambda cfg: "Fashion-MNIST",
    DataName.cifar10: lambda cfg: "CIFAR-10",
    DataName.tensors: lambda cfg: f"your tensors {cfg.path}",
    DataName.synthetic: lambda cfg: "synthetic data",
}


def _subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_data(cfg: DataConfig, shape: Sequence[int] = DEFAULT_SHAPE) -> Dataset:
    """The dataset named by the config, on the CPU, with the configured fixed subsets applied.
    `shape`: the example shape the model needs, used by synthetic data unless data.synthetic_shape is set."""
    ds = LOADERS[cfg.name](cfg, shape)
    xt, yt = _subset(ds.x_train, ds.y_train, cfg.train_subset, cfg.subset_seed)
    xv, yv = _subset(ds.x_val, ds.y_val, cfg.val_subset, cfg.subset_seed + 1)
    if cfg.batch_size > len(xt):
        raise DataError(f"data.batch_size={cfg.batch_size} is larger than the training set ({len(xt)} examples)")
    return Dataset(xt, yt, xv, yv, source=ds.source, classes=ds.classes)


def preflight_data(cfgs: Sequence) -> None:
    """For the configs of every job of a command: read and check each distinct dataset once
    (missing, corrupt, truncated or mismatched files raise DataError) and build each distinct model
    on a batch of its data's shape (a model that does not fit raises ConfigError), before anything runs."""
    import json

    from bnlab.config import to_plain
    from bnlab.models import check_model, natural_shape

    loaded: Dict[str, Dataset] = {}
    checked = set()
    for cfg in cfgs:
        d = cfg.data
        shape = tuple(d.synthetic_shape or natural_shape(cfg.model))
        key = json.dumps([d.name.value, d.root, d.path, d.synthetic_train, d.synthetic_val, shape])
        if key not in loaded:
            loaded[key] = LOADERS[d.name](d, shape)
        ds = loaded[key]
        y = torch.cat([ds.y_train, ds.y_val])
        bad = y[(y < 0) | (y >= ds.classes)]
        if len(bad):  # every loader checks its own files; this is the backstop for all of them
            raise DataError(f"{ds.source}: labels must be in 0-{ds.classes - 1}, found {len(bad)} outside "
                            f"(e.g. {int(bad[0])})")
        n = len(ds.x_train) if d.train_subset is None else min(len(ds.x_train), d.train_subset)
        if d.batch_size > n:
            from bnlab.config import ConfigError

            sub = " after data.train_subset" if d.train_subset else ""
            raise ConfigError(f"data.batch_size must be at most the training set size ({n} examples{sub}), "
                              f"got {d.batch_size}")
        model_key = json.dumps([to_plain(cfg)["model"], to_plain(cfg)["bn"], ds.shape, ds.classes])
        if model_key not in checked:
            check_model(cfg.model, cfg.bn, ds.shape, ds.classes)
            checked.add(model_key)

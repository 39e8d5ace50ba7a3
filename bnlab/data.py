"""Datasets (Fashion-MNIST from its IDX files, a deterministic synthetic set) and the
device-resident batch iterator: tensors on the training device sliced by a fresh permutation."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

from bnlab.config import DataConfig, DataName

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the official .gz files (zalandoresearch/fashion-mnist README), checked after a download.
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
EXPECTED_COUNTS = {"train": 60000, "test": 10000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HOW_TO_GET = ("install Debian's package (apt-get install dataset-fashion-mnist), or put the four "
              "Fashion-MNIST .gz files in a folder and pass data.root=FOLDER (or set $BNLAB_DATA)")


class DataError(ValueError):
    """The dataset is missing, corrupt or truncated; the message says which file and how to fix it."""


@dataclass
class Dataset:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64, for train and validation.
    Validation is Fashion-MNIST's 10k test split, as in Dive into Deep Learning."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)),
                       source=self.source)


def read_idx(path: Path) -> torch.Tensor:
    """Read one gzipped IDX file (unsigned bytes) into a uint8 tensor, checking header and length."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip magic, CRC error, truncated stream
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); {HOW_TO_GET}") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file (no header); {HOW_TO_GET}")
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic); {HOW_TO_GET}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {HOW_TO_GET}")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    n = 1
    for s in shape:
        n *= s
    if len(raw) - header != n:
        raise DataError(f"{path}: IDX body has {len(raw) - header} bytes, header promises {n} "
                        f"(shape {shape}): truncated or corrupt; {HOW_TO_GET}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name, _ in FILES.values())


def cache_dir() -> Path:
    from bnlab.tracking import project_home

    return project_home() / "runs" / "data" / "fashion-mnist"


def _download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in FILES.values():
        target = dest / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(DOWNLOAD_URL + name, timeout=30) as r:
            tmp.write_bytes(r.read())
        got = hashlib.md5(tmp.read_bytes()).hexdigest()
        if got != md5:
            tmp.unlink()
            raise DataError(f"downloaded {name} has MD5 {got}, expected {md5}")
        tmp.rename(target)


def locate_fashion_mnist(root: Optional[str]) -> Path:
    """data.root if given (must hold the files), else $BNLAB_DATA, else Debian's folder, else the
    cache (downloading into it when a network is reachable)."""
    if root is not None:
        folder = Path(root).expanduser()
        if not _has_files(folder):
            missing = [n for n, _ in FILES.values() if not (folder / n).is_file()]
            raise DataError(f"data.root={root!r} does not hold Fashion-MNIST (missing {', '.join(missing)}); "
                            f"{HOW_TO_GET}")
        return folder
    for candidate in (os.environ.get("BNLAB_DATA"), DEBIAN_ROOT, cache_dir()):
        if candidate and _has_files(Path(candidate)):
            return Path(candidate)
    try:
        _download(cache_dir())
    except DataError:
        raise
    except Exception as e:  # no network here, DNS failure, HTTP error
        raise DataError(f"Fashion-MNIST not found in $BNLAB_DATA, {DEBIAN_ROOT} or {cache_dir()}, "
                        f"and the download failed ({type(e).__name__}: {e}); {HOW_TO_GET}") from e
    return cache_dir()


def load_fashion_mnist(root: Optional[str]) -> Dataset:
    folder = locate_fashion_mnist(root)
    t = {key: read_idx(folder / name) for key, (name, _) in FILES.items()}
    for split in ("train", "test"):
        xi, yi = t[f"{split}_images"], t[f"{split}_labels"]
        if xi.shape[1:] != (28, 28) or len(xi) != len(yi) or len(xi) != EXPECTED_COUNTS[split]:
            raise DataError(f"{folder}: {split} split has images {tuple(xi.shape)} and labels "
                            f"{tuple(yi.shape)}, expected {EXPECTED_COUNTS[split]} 28x28 images and labels")
    # Pixels scaled to [0, 1] without centring, as d2l's ToTensor does.
    def imgs(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1).float().div_(255.0)

    return Dataset(imgs(t["train_images"]), t["train_labels"].long(),
                   imgs(t["test_images"]), t["test_labels"].long(), source=str(folder))


def make_synthetic(n_train: int, n_val: int, seed: int = 1234) -> Dataset:
    """Ten classes, each a fixed random 28x28 prototype plus pixel noise: learnable in one epoch,
    deterministic for a given seed, and independent of the run's seed."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 28, 28, generator=g)

    def draw(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (0.6 * protos[y] + 0.4 * torch.rand(n, 1, 28, 28, generator=g)).clamp_(0, 1)
        return x, y

    xt, yt = draw(n_train)
    xv, yv = draw(n_val)
    return Dataset(xt, yt, xv, yv, source="synthetic")


def _subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset named by the config, on the CPU, with the configured fixed subsets applied."""
    if cfg.name == DataName.fashion_mnist:
        ds = load_fashion_mnist(cfg.root)
    else:
        ds = make_synthetic(cfg.synthetic_train, cfg.synthetic_val)
    xt, yt = _subset(ds.x_train, ds.y_train, cfg.train_subset, cfg.subset_seed)
    xv, yv = _subset(ds.x_val, ds.y_val, cfg.val_subset, cfg.subset_seed + 1)
    if cfg.batch_size > len(xt):
        raise DataError(f"data.batch_size={cfg.batch_size} is larger than the training set ({len(xt)} examples)")
    return Dataset(xt, yt, xv, yv, source=ds.source)


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

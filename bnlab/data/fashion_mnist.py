"""Fashion-MNIST from its four gzipped IDX files: Debian's package, data.root, $BNLAB_DATA, or a
checksum-verified download into the cache."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path
from typing import Optional

import torch

from bnlab.data.base import DataError, Dataset

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
    from bnlab.store import project_home

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
        bad = yi[yi.long() >= len(CLASSES)]  # IDX labels are unsigned bytes: never below 0
        if len(bad):
            raise DataError(f"{folder / FILES[split + '_labels'][0]}: labels must be in 0-{len(CLASSES) - 1}, "
                            f"found {len(bad)} outside (e.g. {int(bad[0])})")
    # Pixels scaled to [0, 1] without centring, as d2l's ToTensor does.
    def imgs(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1).float().div_(255.0)

    return Dataset(imgs(t["train_images"]), t["train_labels"].long(),
                   imgs(t["test_images"]), t["test_labels"].long(), source=str(folder))

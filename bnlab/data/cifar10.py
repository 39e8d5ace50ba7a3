"""CIFAR-10 from its python tarball (cifar-10-python.tar.gz, Krizhevsky 2009): data.root, $BNLAB_DATA,
the cache, or a checksum-verified download; members read straight from the tarball, never extracted."""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from bnlab.data.base import DataError, Dataset

TARBALL = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/" + TARBALL
# MD5 of the official tarball (its web page; torchvision's CIFAR10 checks the same value).
MD5 = "c58f30108f718f92721af3b95e74349a"
MEMBER_DIR = "cifar-10-batches-py"
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBER = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HOW_TO_GET = (f"download {URL} (MD5 {MD5}) on a machine with a network and put it in a folder passed "
              f"as data.root=FOLDER (or $BNLAB_DATA=FOLDER); do not unpack it")


def cache_dir() -> Path:
    from bnlab.store import project_home

    return project_home() / "runs" / "data" / "cifar10"


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / TARBALL
    tmp = target.with_suffix(".part")
    with urllib.request.urlopen(URL, timeout=30) as r, open(tmp, "wb") as f:
        while True:
            block = r.read(1 << 20)
            if not block:
                break
            f.write(block)
    got = md5_of(tmp)
    if got != MD5:
        tmp.unlink()
        raise DataError(f"downloaded {TARBALL} has MD5 {got}, expected {MD5}; {HOW_TO_GET}")
    tmp.rename(target)
    return target


def locate_cifar10(root: Optional[str]) -> Path:
    """The tarball: in data.root (a folder, or the tarball itself) if given, else in $BNLAB_DATA,
    else in the cache, else downloaded into the cache where a network is reachable."""
    if root is not None:
        p = Path(root).expanduser()
        if p.is_file():
            return p
        if (p / TARBALL).is_file():
            return p / TARBALL
        raise DataError(f"data.root={root!r} does not hold {TARBALL}; {HOW_TO_GET}")
    for folder in (os.environ.get("BNLAB_DATA"), cache_dir()):
        if folder and (Path(folder) / TARBALL).is_file():
            return Path(folder) / TARBALL
    try:
        return _download(cache_dir())
    except DataError:
        raise
    except Exception as e:  # no network here, DNS failure, HTTP error
        raise DataError(f"CIFAR-10 not found in $BNLAB_DATA or {cache_dir()}, and the download failed "
                        f"({type(e).__name__}: {e}); {HOW_TO_GET}") from e


class _ArraysOnly(pickle.Unpickler):
    """The batches are pickled dicts of numpy arrays: refuse any other global, so a tampered file
    cannot run code (the checksum is checked first; this is the second line)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, path: Path, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    member = f"{MEMBER_DIR}/{name}"
    try:
        f = tar.extractfile(member)
        if f is None:
            raise KeyError(member)
        d = _ArraysOnly(f, encoding="bytes").load()
    except KeyError:
        raise DataError(f"{path}: no member {member}: not the CIFAR-10 python tarball; {HOW_TO_GET}") from None
    except Exception as e:  # truncated gzip, bad pickle
        raise DataError(f"{path}: member {member} is corrupt ({type(e).__name__}: {e}); {HOW_TO_GET}") from e
    import numpy as np

    data, labels = d.get(b"data"), d.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: {member} has no uint8 (N, 3072) 'data' array; {HOW_TO_GET}")
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.shape != (len(data),) or (len(y) and (int(y.min()) < 0 or int(y.max()) > 9)):
        raise DataError(f"{path}: {member} has {len(data)} images but labels {tuple(y.shape)} "
                        f"(values 0..9 expected); {HOW_TO_GET}")
    # Rows are the R, G and B planes of a 32x32 image, each row-major (the dataset's page).
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return x, y


def load_cifar10(root: Optional[str], *, check_md5: bool = True) -> Dataset:
    """The 50k training images and the 10k test images (as validation), float32 in [0, 1]
    (not centred, as Fashion-MNIST here; BN after the first convolution does that)."""
    path = locate_cifar10(root)
    if check_md5:
        got = md5_of(path)
        if got != MD5:
            raise DataError(f"{path}: MD5 {got} does not match CIFAR-10's {MD5}: corrupt, truncated or "
                            f"another file; {HOW_TO_GET}")
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a gzipped tar file ({e}); {HOW_TO_GET}") from e
    with tar:
        parts: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {
            "train": [_read_batch(tar, path, n) for n in TRAIN_MEMBERS],
            "test": [_read_batch(tar, path, TEST_MEMBER)]}
    xt, yt = (torch.cat(t) for t in zip(*parts["train"]))
    xv, yv = parts["test"][0]
    return Dataset(xt.float().div_(255.0), yt, xv.float().div_(255.0), yv, source=str(path))

"""Data layer: the IDX reader on the real Fashion-MNIST and on broken files, dataset location
rules, the synthetic set, and the device-resident batch iterator."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from bnlab import data
from bnlab.config import DataConfig, DataName
from bnlab.data import DataError

from conftest import FASHION


def write_idx(path: Path, arr: torch.Tensor, *, cut: int = 0, magic: bytes | None = None) -> None:
    shape = tuple(arr.shape)
    header = (magic or bytes([0, 0, 8, len(shape)])) + struct.pack(">" + "I" * len(shape), *shape)
    body = arr.to(torch.uint8).numpy().tobytes()
    blob = header + body
    with gzip.open(path, "wb") as f:
        f.write(blob[:len(blob) - cut] if cut else blob)


def fake_root(tmp_path: Path, n_train=60000, n_test=10000) -> Path:
    root = tmp_path / "fm"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g))
    return root


@pytest.mark.slow
def test_real_fashion_mnist_loads():
    assert FASHION.is_dir(), "install Debian's dataset-fashion-mnist (make setup does)"
    ds = data.load_data(DataConfig())
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_val.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert torch.bincount(ds.y_val).tolist() == [1000] * 10


def test_subsets_are_fixed_and_sized():
    a = data.load_data(DataConfig(name=DataName.synthetic, train_subset=100, val_subset=50, batch_size=32))
    b = data.load_data(DataConfig(name=DataName.synthetic, train_subset=100, val_subset=50, batch_size=32))
    assert len(a.x_train) == 100 and len(a.x_val) == 50
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)


def test_root_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.root.*does not hold Fashion-MNIST.*dataset-fashion-mnist"):
        data.locate_fashion_mnist(str(tmp_path))


def test_bad_magic_truncated_and_corrupt_files(tmp_path):
    root = fake_root(tmp_path, n_train=20, n_test=10)
    ok = data.read_idx(root / "train-images-idx3-ubyte.gz")
    assert ok.shape == (20, 28, 28)
    imgs = torch.zeros(5, 28, 28)
    write_idx(tmp_path / "cut.gz", imgs, cut=100)
    with pytest.raises(DataError, match="cut.gz.*truncated"):
        data.read_idx(tmp_path / "cut.gz")
    write_idx(tmp_path / "magic.gz", imgs, magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(tmp_path / "magic.gz")
    raw = (root / "train-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "halfgz.gz").write_bytes(raw[: len(raw) // 2])  # a download cut short
    with pytest.raises(DataError, match="halfgz.gz.*corrupt or truncated"):
        data.read_idx(tmp_path / "halfgz.gz")
    (tmp_path / "notgz.gz").write_bytes(b"hello, not gzip at all")
    with pytest.raises(DataError, match="notgz.gz"):
        data.read_idx(tmp_path / "notgz.gz")


def test_wrong_counts_are_rejected(tmp_path):
    root = fake_root(tmp_path, n_train=100, n_test=10)
    with pytest.raises(DataError, match="expected 60000"):
        data.load_fashion_mnist(str(root))


def test_missing_everywhere_and_no_network_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setattr(data.fashion_mnist, "DEBIAN_ROOT", tmp_path / "nowhere")
    monkeypatch.setattr(data.fashion_mnist, "cache_dir", lambda: tmp_path / "cache")

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="download failed.*apt-get install dataset-fashion-mnist"):
        data.locate_fashion_mnist(None)


def test_env_var_root_is_used(tmp_path, monkeypatch):
    root = fake_root(tmp_path, n_train=5, n_test=5)
    monkeypatch.setenv("BNLAB_DATA", str(root))
    monkeypatch.setattr(data.fashion_mnist, "DEBIAN_ROOT", tmp_path / "nowhere")
    assert data.locate_fashion_mnist(None) == root


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = data.make_synthetic(64, 32), data.make_synthetic(64, 32)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.x_train.shape == (64, 1, 28, 28) and set(a.y_train.tolist()) <= set(range(10))


def test_train_batches_drop_the_partial_batch_and_cover_a_permutation():
    x = torch.arange(103).float().view(-1, 1)
    y = torch.arange(103)
    batches = list(data.train_batches(x, y, 10, torch.Generator().manual_seed(0)))
    assert len(batches) == 10 and all(len(b[0]) == 10 for b in batches)
    seen = torch.cat([b[1] for b in batches])
    assert len(set(seen.tolist())) == 100  # no repeats
    again = torch.cat([b[1] for b in data.train_batches(x, y, 10, torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)
    other = torch.cat([b[1] for b in data.train_batches(x, y, 10, torch.Generator().manual_seed(1))])
    assert not torch.equal(seen, other)


def test_eval_batches_keep_every_example():
    x = torch.arange(23).float().view(-1, 1)
    got = torch.cat([b[1] for b in data.eval_batches(x, torch.arange(23), 5)])
    assert torch.equal(got, torch.arange(23))


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(DataError, match="data.batch_size"):
        data.load_data(DataConfig(name=DataName.synthetic, synthetic_train=10, batch_size=64))

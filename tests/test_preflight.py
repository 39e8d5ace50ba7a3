"""Everything knowable is checked before anything runs: one line naming the field and what is
allowed, exit 2, nothing written (no store, no Hydra folder). Also bnlab-train's own --help.
bnlab-train's main runs in this process: it refuses before Hydra or MLflow start."""
from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CONF_DIR, FASHION

SYN = ["data=synthetic", "train.threads=1"]


@pytest.fixture
def refused(train_cmd, home):
    def check(*args: str, field: str) -> str:
        code, out, err = train_cmd(*args)
        assert code == 2, (code, out[-2000:], err[-2000:])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("bnlab-train: error: ") and field in lines[0], lines[0]
        assert "Traceback" not in out + err
        assert not (home / "runs").exists(), "something was written"
        return lines[0]

    return check


@pytest.mark.parametrize("override,field", [
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("bn.eps=inf", "bn.eps"),
    ("optim.momentum=-inf", "optim.momentum"),
    ("bn.shadow_momenta=[0.1,nan]", "bn.shadow_momenta"),
])
def test_non_finite_numbers(refused, override, field):
    line = refused(*SYN, override, field=field)
    assert "finite" in line or "in [0" in line


def test_non_finite_in_a_sweep_stops_every_job(refused):
    refused("-m", *SYN, "optim.lr=0.1,inf", field="optim.lr")


def test_batch_larger_than_the_training_set(refused):
    line = refused("-m", *SYN, "data.batch_size=64,100000", field="data.batch_size")
    assert "2048" in line
    line = refused(*SYN, "data.train_subset=100", "data.batch_size=128", field="data.batch_size")
    assert "100 examples after data.train_subset" in line


def test_cuda_device_that_is_not_there(refused):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(*SYN, "train.device=cuda", field="train.device")


@pytest.mark.slow  # the real Fashion-MNIST files, one label changed
def test_labels_outside_the_class_range(refused, tmp_path):
    if not (FASHION / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    root = tmp_path / "fm"
    root.mkdir()
    for f in FASHION.glob("*.gz"):
        (root / f.name).symlink_to(f)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    raw = bytearray(gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz").read())
    raw[8 + 123] = 12  # one label of the test split out of 0-9
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    line = refused(f"data.root={root}", "train.threads=1", field="t10k-labels-idx1-ubyte.gz")
    assert "0-9" in line and "12" in line


def test_unknown_store_scheme(refused):
    refused(*SYN, "tracking.uri=bogus://x", field="tracking.uri")


def test_unwritable_store_location(refused, tmp_path):
    # Root ignores file modes: a read-only file system is what root cannot write either.
    if os.geteuid() == 0:
        mnt = tmp_path / "ro"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
    else:
        mnt = tmp_path / "ro"
        mnt.mkdir(mode=0o555)
    try:
        line = refused(*SYN, f"tracking.uri=sqlite:///{mnt}/sub/mlflow.db", field="tracking.uri")
        assert "not writable" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_http_store_that_does_not_answer(refused, monkeypatch):
    # One request to /health, never MLflow's client (whose retries take about 4 minutes).
    import mlflow

    def no_client(*a, **k):
        raise AssertionError("the preflight must not go through MLflow's client")

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "__init__", no_client)
    line = refused(*SYN, "tracking.uri=http://127.0.0.1:9", field="tracking.uri")
    assert "does not answer" in line


def test_unknown_study_lists_the_studies(refused):
    line = refused("study=doesnotexist", field="study")
    for s in ("smoke", "update_ops", "momentum", "lr"):
        assert s in line


def test_several_studies_in_one_command_are_refused(refused):
    line = refused("-m", "study=smoke,update_ops", field="study")
    assert "one by one" in line and "bnlab-train study=smoke" in line and "bnlab-train study=update_ops" in line


def test_help_names_the_studies_then_hydra(train_cmd, home):
    code, out, err = train_cmd("--help")
    assert code == 0, err
    studies = sorted(p.stem for p in (CONF_DIR / "study").glob("*.yaml"))
    for s in studies:
        assert f"\n  {s} " in out, s
    assert "54 runs" in " ".join(out.split())  # the size from bnlab/conf/study/lr.yaml's header
    assert "bnlab/config.py" in out
    # bnlab's text first, then Hydra's own help
    assert out.index("bnlab/config.py") < out.index("Powered by Hydra")
    assert not (home / "runs").exists()

"""Everything knowable is checked before anything runs: one line naming the field and what is
allowed, exit 2, nothing written (no store, no Hydra folder). Also bnlab-train's own --help."""
from __future__ import annotations

import gzip
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FASHION, cli

SYN = ["data=synthetic", "train.threads=1"]


def _refused(home: Path, *args: str, field: str, timeout: float = 120) -> str:
    r = cli("bnlab-train", *args, home=home, timeout=timeout)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bnlab-train: error: ") and field in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not (home / "runs").exists(), "something was written"
    return lines[0]


@pytest.mark.parametrize("override,field", [
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("bn.eps=inf", "bn.eps"),
    ("optim.momentum=-inf", "optim.momentum"),
    ("bn.shadow_momenta=[0.1,nan]", "bn.shadow_momenta"),
])
def test_non_finite_numbers(home, override, field):
    line = _refused(home, *SYN, override, field=field)
    assert "finite" in line or "in [0" in line


def test_non_finite_in_a_sweep_stops_every_job(home):
    _refused(home, "-m", *SYN, "optim.lr=0.1,inf", field="optim.lr")


def test_batch_larger_than_the_training_set(home):
    line = _refused(home, "-m", *SYN, "data.batch_size=64,100000", field="data.batch_size")
    assert "2048" in line
    line = _refused(home, *SYN, "data.train_subset=100", "data.batch_size=128", field="data.batch_size")
    assert "100 examples after data.train_subset" in line


def test_cuda_device_that_is_not_there(home):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _refused(home, *SYN, "train.device=cuda", field="train.device")


def test_labels_outside_the_class_range(home, tmp_path):
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
    line = _refused(home, f"data.root={root}", "train.threads=1", field="t10k-labels-idx1-ubyte.gz")
    assert "0-9" in line and "12" in line


def test_unknown_store_scheme(home):
    _refused(home, *SYN, "tracking.uri=bogus://x", field="tracking.uri")


def test_unwritable_store_location(home, tmp_path):
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
        line = _refused(home, *SYN, f"tracking.uri=sqlite:///{mnt}/sub/mlflow.db", field="tracking.uri")
        assert "not writable" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_http_store_that_does_not_answer(home):
    t0 = time.time()
    line = _refused(home, *SYN, "tracking.uri=http://127.0.0.1:9", field="tracking.uri")
    assert "does not answer" in line
    assert time.time() - t0 < 60  # MLflow's own retries would take about 4 minutes


def test_unknown_study_lists_the_studies(home):
    line = _refused(home, "study=doesnotexist", field="study")
    for s in ("smoke", "update_ops", "momentum", "lr"):
        assert s in line


def test_several_studies_in_one_command_are_refused(home):
    line = _refused(home, "-m", "study=smoke,update_ops", field="study")
    assert "one by one" in line and "bnlab-train study=smoke" in line and "bnlab-train study=update_ops" in line


def test_help_names_the_studies_then_hydra(home):
    r = cli("bnlab-train", "--help", home=home, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    studies = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bnlab" / "conf" / "study").glob("*.yaml"))
    for s in studies:
        assert f"\n  {s} " in out, s
    assert "54 runs" in " ".join(out.split())  # the size from bnlab/conf/study/lr.yaml's header
    assert "bnlab/config.py" in out
    # bnlab's text first, then Hydra's own help
    assert out.index("bnlab/config.py") < out.index("Powered by Hydra")
    assert not (home / "runs").exists()

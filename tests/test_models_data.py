"""Models and data for any network: the registry (ResNet-20, custom models from a test module), the
CIFAR-10 tarball loader on a small tarball made here, user tensors files, synthetic data in the
model's shape, and one-line errors before anything runs."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnlab import bn, cli
from bnlab.config import Activation, BNConfig, ConfigError, ModelConfig, ModelName, Placement
from bnlab.data import DataError, cifar10, load_cifar10, load_data, load_tensors
from bnlab.models import build_model

from conftest import STUDIES, main_exit, run_job, runs_of, store_uri

TESTS = Path(__file__).resolve().parent


class TinyNet(nn.Module):
    """A researcher's own model (model=custom model.target=test_models_data:TinyNet), torch BN inside."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * width, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def not_a_model():
    return 42


# ----------------------------------------------------------------------------- models

def test_resnet20_architecture():
    m = build_model(ModelConfig(name=ModelName.resnet20), BNConfig())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    bns = bn.bn_modules(m)
    # He et al. 2016 sec. 4.2: 6n+2 = 20 weighted layers (19 convolutions + 1 linear), 0.27M parameters.
    assert len(convs) == 19 and len(bns) == 19 and isinstance(list(m.modules())[-1], nn.Linear)
    assert sum(p.numel() for p in m.parameters()) == 269722
    assert [c.out_channels for c in convs][::6] == [16, 16, 32, 64]
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model(ModelConfig(name=ModelName.resnet20), BNConfig(), (1, 28, 28), 7)
    assert gray(torch.rand(3, 1, 28, 28)).shape == (3, 7)


def test_resnet20_placement():
    m = ModelConfig(name=ModelName.resnet20, activation=Activation.relu)
    none = build_model(m, BNConfig(placement=Placement.none))
    assert bn.bn_modules(none) == [] and all(c.bias is not None for c in none.modules() if isinstance(c, nn.Conv2d))
    after = build_model(m, BNConfig(placement=Placement.after_act))
    block = after[3]
    # after_act: conv -> + -> act -> BN in the second half; conv -> act -> BN in the first.
    assert [type(x) for x in block.first] == [nn.Conv2d, nn.ReLU, bn.BatchNorm2d]
    assert [type(x) for x in block.pre_add] == [nn.Conv2d]
    assert [type(x) for x in block.post_add] == [nn.ReLU, bn.BatchNorm2d]
    before = build_model(m, BNConfig())[3]
    assert [type(x) for x in before.pre_add] == [nn.Conv2d, bn.BatchNorm2d] and \
        [type(x) for x in before.post_add] == [nn.ReLU]
    x = torch.rand(4, 3, 16, 16)
    assert after(x).shape == none(x).shape == (4, 10)


def test_builtin_refuses_data_of_another_shape():
    with pytest.raises(ConfigError, match="model=lenet needs examples of shape 1x28x28, the data has 3x32x32"):
        build_model(ModelConfig(), BNConfig(), (3, 32, 32))


def test_custom_model_from_a_test_module_is_converted():
    m = ModelConfig(name=ModelName.custom, target="test_models_data:TinyNet", kwargs={"width": 4})
    model = build_model(m, BNConfig(momentum=0.01, shadow_momenta=[0.5]))
    bns = bn.bn_modules(model)
    assert [type(x) for x in bns] == [bn.BatchNorm2d, bn.BatchNorm1d]
    assert all(x.momentum == 0.01 and x.shadow_momenta == (0.5,) for x in bns)
    assert model.features[0].out_channels == 4
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules())


@pytest.mark.parametrize("target, match", [
    ("no_such_module_xyz:Net", "cannot be imported.*No module named"),
    ("test_models_data:Missing", "cannot be imported.*AttributeError"),
    ("test_models_data:not_a_model", "returned a int, not a torch.nn.Module"),
])
def test_custom_bad_target_is_one_line(target, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_model(ModelConfig(name=ModelName.custom, target=target), BNConfig())
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- CIFAR-10 tarball

def make_cifar_tarball(path: Path, n_train: int = 4, n_test: int = 3, drop: str | None = None,
                       seed: int = 0) -> Path:
    """A tarball in the format of cifar-10-python.tar.gz (protocol-2 pickles of dicts with bytes keys,
    uint8 (N, 3072) rows of R, G, B planes), with few images per batch."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for name in cifar10.TRAIN_MEMBERS + (cifar10.TEST_MEMBER, "batches.meta"):
            if name == drop:
                continue
            n = n_test if name == cifar10.TEST_MEMBER else n_train
            if name == "batches.meta":
                d = {b"label_names": [c.encode() for c in cifar10.CLASSES], b"num_vis": 3072}
            else:
                d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     b"filenames": [f"img{i}.png".encode() for i in range(n)]}
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"{cifar10.MEMBER_DIR}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_cifar10_tarball_loads_with_its_checksum(tmp_path, monkeypatch):
    tb = make_cifar_tarball(tmp_path / cifar10.TARBALL)
    monkeypatch.setattr(cifar10, "MD5", _md5(tb))
    ds = load_cifar10(str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_val.shape == (3, 3, 32, 32) and ds.classes == 10
    assert ds.x_train.dtype == torch.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    with tarfile.open(tb) as tar:
        first = pickle.load(tar.extractfile(f"{cifar10.MEMBER_DIR}/data_batch_1"), encoding="bytes")
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    row = first[b"data"][1]
    assert ds.x_train[1, 1, 2, 5].item() == pytest.approx(row[1024 + 2 * 32 + 5] / 255.0)
    assert ds.y_train[:4].tolist() == first[b"labels"]
    # The tarball itself as data.root, and through $BNLAB_DATA.
    assert len(load_cifar10(str(tb)).x_train) == 20
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path))
    assert len(load_cifar10(None).x_val) == 3


def test_cifar10_checksum_mismatch_is_one_clear_line(tmp_path):
    make_cifar_tarball(tmp_path / cifar10.TARBALL)
    with pytest.raises(DataError, match=f"MD5 [0-9a-f]{{32}} does not match CIFAR-10's {cifar10.MD5}") as e:
        load_cifar10(str(tmp_path))
    assert "\n" not in str(e.value) and "data.root=FOLDER" in str(e.value)


def test_cifar10_missing_member_and_missing_file(tmp_path, monkeypatch):
    tb = make_cifar_tarball(tmp_path / cifar10.TARBALL, drop="test_batch")
    monkeypatch.setattr(cifar10, "MD5", _md5(tb))
    with pytest.raises(DataError, match="no member cifar-10-batches-py/test_batch"):
        load_cifar10(str(tmp_path))
    with pytest.raises(DataError, match="does not hold cifar-10-python.tar.gz.*download https://"):
        load_cifar10(str(tmp_path / "empty"))


def test_cifar10_nowhere_and_no_network_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setattr(cifar10, "cache_dir", lambda: tmp_path / "cache")

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar10.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="download failed.*network is unreachable.*data.root=FOLDER"):
        load_cifar10(None)


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    tb = tmp_path / cifar10.TARBALL
    with tarfile.open(tb, "w:gz") as tar:
        blob = pickle.dumps({b"data": Evil()}, protocol=2)
        info = tarfile.TarInfo(f"{cifar10.MEMBER_DIR}/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setattr(cifar10, "MD5", _md5(tb))
    with pytest.raises(DataError, match="corrupt.*unexpected object (__builtin__|builtins).print"):
        load_cifar10(str(tmp_path))


def test_cifar10_bad_input_stops_the_cli_before_anything_is_written(home, tmp_path, train_cmd):
    make_cifar_tarball(tmp_path / cifar10.TARBALL)  # not the real file: its MD5 does not match
    code, _, err = train_cmd("model=resnet20", "data=cifar10", f"data.root={tmp_path}")
    assert code == 2
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnlab-train: error: ") and "does not match CIFAR-10" in err[0]
    assert not (home / "runs").exists()


# ----------------------------------------------------------------------------- tensors files

def _tensors(n=20, shape=(2, 6, 6), classes=3):
    g = torch.Generator().manual_seed(0)
    return {"x_train": torch.rand(n, *shape, generator=g), "y_train": torch.randint(0, classes, (n,), generator=g),
            "x_val": torch.rand(8, *shape, generator=g), "y_val": torch.arange(8) % classes}


def test_tensors_pt_and_npz(tmp_path):
    d = _tensors()
    torch.save(d, tmp_path / "mine.pt")
    np.savez(tmp_path / "mine.npz", **{k: v.numpy() for k, v in d.items()})
    for f in ("mine.pt", "mine.npz"):
        ds = load_tensors(str(tmp_path / f))
        assert torch.equal(ds.x_train, d["x_train"]) and torch.equal(ds.y_val, d["y_val"])
        assert ds.shape == (2, 6, 6) and ds.classes == 3


@pytest.mark.parametrize("broken, match", [
    (lambda d: d.pop("y_val"), "lacks y_val"),
    (lambda d: d.update(y_train=d["y_train"][:-1]), "y_train must be integer labels of shape \\(20,\\)"),
    (lambda d: d.update(y_train=d["y_train"].float()), "y_train must be integer labels"),
    (lambda d: d.update(x_val=torch.rand(8, 2, 5, 5)), "x_train examples have shape \\(2, 6, 6\\) but x_val \\(2, 5, 5\\)"),
    (lambda d: d.update(y_val=d["y_val"] - 5), "labels must be 0..K-1"),
])
def test_tensors_mismatch_is_one_line(tmp_path, broken, match):
    d = _tensors()
    broken(d)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=match) as e:
        load_tensors(str(tmp_path / "bad.pt"))
    assert "\n" not in str(e.value)


def test_tensors_unreadable_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "x.csv").write_text("1,2")
    for name, match in (("junk.npz", "unreadable .npz"), ("junk.pt", "unreadable .pt"), ("x.csv", "suffix '.csv'"),
                        ("none.pt", "no such file")):
        with pytest.raises(DataError, match=match):
            load_tensors(str(tmp_path / name))


# ----------------------------------------------------------------------------- synthetic shape, preflight

def test_synthetic_data_takes_the_model_shape():
    from bnlab.config import DataConfig, DataName
    from bnlab.models import natural_shape

    cfg = DataConfig(name=DataName.synthetic, synthetic_train=64, synthetic_val=16, batch_size=8)
    assert load_data(cfg, natural_shape(ModelConfig(name=ModelName.resnet20))).shape == (3, 32, 32)
    assert load_data(cfg).shape == (1, 28, 28)
    cfg.synthetic_shape = [2, 12, 12]
    assert load_data(cfg, (3, 32, 32)).shape == (2, 12, 12)


@pytest.mark.parametrize("args, match", [
    (["data=tensors"], "data.path"),
    (["model=custom", "data=synthetic"], "model.target"),
    (["model=custom", "model.target=test_models_data:TinyNet", "bn.placement=none", "data=synthetic"],
     "bn.placement must be before_act with model=custom"),
    (["model=custom", "model.target=nowhere_xyz:Net", "data=synthetic"], "model.target='nowhere_xyz:Net' cannot be imported"),
    (["model=lenet", "data=synthetic", "data.synthetic_shape=[3,32,32]"], "model=lenet needs examples of shape 1x28x28"),
    (["model=custom", "model.target=test_models_data:TinyNet", "data=synthetic", "data.synthetic_shape=[1,8,8]"],
     "cannot take examples of shape \\(1, 8, 8\\)"),
    (["model=custom", "model.target=test_models_data:TinyNet", "+model.kwargs.classes=4", "data=synthetic"],
     "must output \\(batch, 10\\) class scores"),
    (["data=synthetic", "data.synthetic_shape=[0,4]"], "data.synthetic_shape must be"),
])
def test_preflight_refuses_with_one_line(home, args, match):
    cli._prepare_env()
    with pytest.raises((ConfigError, DataError), match=match) as e:
        cli.preflight(args)
    assert "\n" not in str(e.value)


def test_every_study_validates_with_resnet20_on_cifar10(home):
    cli._prepare_env()
    for study in STUDIES:
        jobs, _ = cli.expand_jobs([f"study={study}", "model=resnet20", "data=cifar10"])
        for job, cfg in zip(jobs, cli.validate_jobs(jobs)):
            assert cfg.model.name == ModelName.resnet20 and cfg.data.name.value == "cifar10", (study, job)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.usefixtures("store_home")
def test_custom_model_runs_end_to_end(home, capsys):
    # model.target names a module of this tests folder, which is on sys.path here
    run_job("model=custom", "model.target=test_models_data:TinyNet", "+model.kwargs.width=4",
            "data=synthetic", "data.synthetic_train=128", "data.synthetic_val=64", "data.batch_size=16",
            "train.epochs=1", "bn.precise_samples=64", "train.bs1_samples=4", "train.threads=1", "optim.lr=0.1")
    assert "val/acc_precise_bn" in capsys.readouterr().out
    _, runs = runs_of(home, "bnlab")
    assert [r.info.status for r in runs] == ["FINISHED"] and "val/acc_precise_bn" in runs[0].data.metrics


@pytest.mark.usefixtures("store_home")
def test_resnet20_smoke_run_then_load_run_and_bnlab_diagnose(home, tmp_path, capsys, monkeypatch):
    import bnlab
    from bnlab import load

    monkeypatch.chdir(tmp_path)
    run_job("model=resnet20", "data=synthetic", "data.synthetic_train=192", "data.synthetic_val=64",
            "data.batch_size=32", "train.epochs=2", "bn.precise_samples=96", "train.bs1_samples=4",
            "train.threads=1", "bn.shadow_momenta=[0.5]")
    c, runs = runs_of(home, "bnlab")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [a.path for a in c.list_artifacts(run_id) if a.path == "model.pt"] == ["model.pt"]

    loaded = bnlab.load_run(run_id, store_uri(home))
    assert loaded.config.model.name == ModelName.resnet20 and loaded.shape == (3, 32, 32)
    assert len(bn.bn_modules(loaded.model)) == 19 and bn.bn_modules(loaded.model)[0].shadow_momenta == (0.5,)
    # The rebuilt model gives the logged validation accuracy (running statistics) on the same data.
    from bnlab.evaluation import evaluate

    ds = load_data(loaded.config.data, loaded.shape)
    acc = evaluate(loaded.model, ds.x_val, ds.y_val, loaded.config.data.eval_batch_size)["acc"]
    assert acc == pytest.approx(runs[0].data.metrics["val/acc"], abs=1e-9)

    # bnlab-diagnose's main, in this process
    capsys.readouterr()
    assert main_exit(load.main, run_id) == 0
    out = capsys.readouterr().out
    assert f"run {run_id}: model=resnet20 data=synthetic" in out
    assert "BN layers (running vs population statistics from 96 training examples)" in out
    assert out.count("BatchNorm2d") == 19 and "\nverdict: " in out
    for stats in ("running", "batch", "precise"):
        assert f"\n{stats} " in out

    assert main_exit(load.main, "0" * 32) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bnlab-diagnose: error: no run")
    assert main_exit(load.main, run_id, "seed=3") == 2
    assert "takes tracking.uri=URI and data.root=DIR" in capsys.readouterr().err
    assert main_exit(load.main, run_id, f"tracking.uri=sqlite:///{tmp_path / 'none.db'}") == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists(), "reading a run never creates a store"


def test_import_bnlab_is_cheap_and_exports_the_instruments():
    import subprocess
    import sys

    code = ("import sys, bnlab; assert 'torch' not in sys.modules and 'mlflow' not in sys.modules; "
            "from bnlab import convert_bn, diagnose, load_run; from bnlab import bn; "
            "assert bn.convert_bn is convert_bn and bn.diagnose is diagnose and callable(load_run); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

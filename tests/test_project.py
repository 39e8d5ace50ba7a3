"""A researcher's own project folder: packaged configs and the user's own studies/models on one search
path (studies.py), where runs, artifacts and the report go, and records that reproduce from any folder.
In-process where possible (the real compose, the real store); one CLI run in a subprocess."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bnlab
from bnlab import cli, describe, store, studies
from bnlab.config import (Config, ConfigError, DataConfig, DataName, ModelConfig, ModelName, Placement,
                          to_plain)

from conftest import cli as run_cli

BUILTIN_STUDIES = {"smoke", "update_ops", "momentum", "batch_size", "lr", "placement", "d2l", "ema_vs_precise",
                   "precise_samples", "norm_batch", "gamma_beta"}

MY_STUDY = """\
# @package _global_
# Question: does my own grid run?
#   (a second line of the question)
# Run:    bnlab-train study=mystudy   (4 runs, seconds)
# Report: bnlab-report study=mystudy
defaults:
  - override /data: synthetic
tracking:
  experiment: mystudy
  study: mystudy
data:
  synthetic_train: 128
  synthetic_val: 64
  batch_size: 32
bn:
  precise_samples: 64
train:
  epochs: 1
  bs1_samples: 4
  progress: false
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      bn.momentum: 0.1,0.3
      seed: 0,1
"""

MY_NETS = """\
from torch import nn


def net(classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder as the working directory, no BNLAB_HOME, no user config variables."""
    p = tmp_path / "project"
    p.mkdir()
    for var in ("BNLAB_HOME", studies.ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(p)
    cli._prepare_env()
    monkeypatch.delenv("BNLAB_HOME", raising=False)  # _prepare_env sets it; these tests read the cwd rule
    return p


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _preflight(args):
    """What bnlab-train does before Hydra runs: fold the user's folders in, then validate every job."""
    return cli.preflight(cli.user_config(args))


# ------------------------------------------------------------------ 1. configs inside the package

def test_packaged_configs_list_every_builtin_study_and_match_hydras_own_listing(project):
    assert BUILTIN_STUDIES <= set(studies.options("study"))
    assert {"lenet", "mlp", "resnet20", "custom"} <= set(studies.options("model"))
    assert "slurm" in studies.options("hydra/launcher")
    _write(project / "conf" / "study" / "mystudy.yaml", MY_STUDY)
    _write(project / "conf" / "model" / "mine.yaml", "name: custom\ntarget: mynets:net\n")
    # Hydra's own config loader over the search path bnlab-train gives it lists the same options.
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module("bnlab.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in ("study", "model", "data", "hydra/launcher"):
            hydras = loader.get_group_options(group, config_name="train", overrides=[cli.searchpath_override()])
            assert studies.options(group) == sorted(set(hydras)) or group == "hydra/launcher", group
            assert set(studies.options(group)) <= set(hydras), group  # Hydra adds its own launchers
    assert "mystudy" in studies.options("study") and "mine" in studies.options("model")
    # The header of a packaged study, read through the package (not a path beside it).
    assert studies.header("lr")["Run"].startswith("bnlab-train study=lr")


def test_the_wheel_carries_every_yaml_of_the_config_tree():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bnlab.conf"]
    conf = root / "bnlab" / "conf"
    files = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    carried = {p.relative_to(conf) for pattern in data for p in conf.glob(pattern)}
    assert files and files == carried
    assert (conf / "__init__.py").is_file()  # pkg://bnlab.conf needs a package at the root


# ------------------------------------------------------------------ 2. the user's config folder

@pytest.mark.parametrize("how", ["./conf", "--config-dir", "hydra.searchpath", "env", "+study"])
def test_a_study_of_your_own_is_accepted_however_its_folder_is_given(project, tmp_path, monkeypatch, how):
    folder = project / "conf" if how in ("./conf", "+study") else tmp_path / "elsewhere"
    _write(folder / "study" / "mystudy.yaml", MY_STUDY)
    args = ["study=mystudy"]
    if how == "--config-dir":
        args = ["--config-dir", str(folder)] + args
    elif how == "hydra.searchpath":
        args = [f"hydra.searchpath=[file://{folder}]"] + args
    elif how == "env":
        monkeypatch.setenv(studies.ENV, str(folder))
    elif how == "+study":  # Hydra's append syntax: the group exists, so one line says how
        with pytest.raises(ConfigError, match=r"^\+study: .*write study=mystudy \(no \+\)$"):
            _preflight(["+study=mystudy"])
    n, multirun = _preflight(args)
    assert (n, multirun) == (4, True)
    jobs, _ = cli.expand_jobs([a for a in cli.user_config(args) if not a.startswith("-")])
    cfg = cli.validate_job(jobs[0])
    assert cfg.tracking.study == "mystudy" and cfg.data.name == DataName.synthetic
    # Everything that lists or reads studies sees it: --help, descriptions, the report.
    assert "mystudy" in cli.help_text() and "does my own grid run? (a second line" in cli.help_text()
    note = describe.experiment_description("mystudy", 4)
    assert "does my own grid run?" in note and "`bnlab-train study=mystudy`" in note
    assert "experiments/mystudy.md" not in note  # no study card for a user's study
    from bnlab.analysis import report, study

    assert "mystudy" in study.known_studies()
    assert study.study_question("mystudy").startswith("does my own grid run?")
    assert report.reproduce_text("mystudy").startswith("`bnlab-train study=mystudy`")


def test_a_model_and_data_of_your_own_from_the_project_folder(project):
    _write(project / "mynets.py", MY_NETS)
    _write(project / "conf" / "model" / "mine.yaml", "# @package _global_\nmodel:\n  name: custom\n"
                                                      "  target: mynets:net\noptim:\n  lr: 0.05\n")
    rng = torch.Generator().manual_seed(0)
    import numpy as np

    np.savez(project / "data.npz", x_train=torch.rand(64, 3, 8, 8, generator=rng).numpy(),
             y_train=(torch.arange(64) % 10).numpy(), x_val=torch.rand(32, 3, 8, 8, generator=rng).numpy(),
             y_val=(torch.arange(32) % 10).numpy())
    args = ["model=mine", "data=tensors", "data.path=data.npz", "data.batch_size=16"]
    assert _preflight(args) == (1, False)
    cfg = cli.validate_job(args)
    assert cfg.model.target == "mynets:net" and cfg.optim.lr == 0.05
    assert cfg.data.path == str(project / "data.npz")  # recorded absolute


def test_a_user_file_named_like_a_builtin_is_refused_in_one_line(project):
    _write(project / "conf" / "study" / "smoke.yaml", MY_STUDY.replace("mystudy", "smoke"))
    with pytest.raises(ConfigError) as e:
        _preflight(["study=smoke"])
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{project / 'conf' / 'study' / 'smoke.yaml'} has the name")
    assert "built-in study=smoke" in line and "rename" in line
    _preflight(["data=synthetic", "train.epochs=1"])  # not selected: no effect on other commands
    _write(project / "conf" / "train.yaml", "defaults: []\n")
    with pytest.raises(ConfigError, match="conf/train.yaml has the name of bnlab's primary config train.yaml"):
        _preflight(["data=synthetic"])


def test_config_path_and_missing_config_dir_are_refused(project):
    with pytest.raises(ConfigError, match="--config-path replaces bnlab's own configs"):
        cli.user_config(["--config-path", "conf"])
    with pytest.raises(ConfigError, match="--config-dir: no such folder 'nowhere'"):
        cli.user_config(["--config-dir", "nowhere"])


def test_an_unknown_study_names_where_studies_were_looked_for(project):
    (project / "conf").mkdir()
    with pytest.raises(ConfigError) as e:
        _preflight(["study=mystudy"])
    assert str(e.value).startswith("study must be one of batch_size, d2l") and str(project / "conf") in str(e.value)


# ------------------------------------------------------------------ 3. where things go

def test_the_project_folder_is_the_working_directory_or_bnlab_home(project, tmp_path, monkeypatch):
    assert store.project_home() == project
    assert store.default_uri() == f"sqlite:///{project / 'runs' / 'mlflow.db'}"
    assert store.artifact_root() == project / "runs" / "artifacts"
    monkeypatch.setenv("BNLAB_HOME", str(tmp_path / "h"))
    assert store.project_home() == tmp_path / "h"
    assert store.resolve_uri(None) == f"sqlite:///{tmp_path / 'h' / 'runs' / 'mlflow.db'}"


def test_mlflow_tracking_uri_is_honoured_and_the_command_line_wins(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    assert store.resolve_uri(None) == f"sqlite:///{project / 'mine.db'}"  # relative: to the cwd, as MLflow
    assert store.resolve_uri("sqlite:////tmp/x/other.db") == "sqlite:////tmp/x/other.db"
    assert store.artifact_root(None) == project / "artifacts"  # beside the store it follows
    assert store.artifact_root("sqlite:////tmp/x/other.db") == Path("/tmp/x/artifacts")


def test_the_report_never_writes_into_the_installed_package(project, capsys):
    from bnlab.analysis import report

    inside = Path(bnlab.__file__).resolve().parent / "results"
    assert report.main([f"out={inside}"]) == 2
    assert not inside.exists()
    assert "installed package folder" in capsys.readouterr().err
    assert studies.installed_location(project / "results") is None


@pytest.mark.subprocess
def test_a_run_started_in_the_project_folder_lands_there_and_mlflow_sees_it(project):
    from mlflow.tracking import MlflowClient

    _write(project / "conf" / "study" / "mystudy.yaml", MY_STUDY)
    env = {"BNLAB_HOME": ""}  # conftest.cli sets it; empty = unset for project_home()
    r = run_cli("bnlab-train", "study=mystudy", "seed=0", "bn.momentum=0.1", home=project, cwd=project,
                env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (project / "runs" / "mlflow.db").is_file() and (project / "runs" / "hydra").is_dir()
    hint = [ln for ln in r.stdout.splitlines() if "MLFLOW_TRACKING_URI=" in ln]
    assert len(hint) == 1
    uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", hint[0]).group(1)
    assert uri == "sqlite:///runs/mlflow.db"  # relative to the project folder, where the user types it
    c = MlflowClient(tracking_uri=uri)  # read from the project folder (the cwd) as mlflow would
    exp = c.get_experiment_by_name("mystudy")
    runs = c.search_runs([exp.experiment_id])
    assert len([x for x in runs if x.data.tags.get("bnlab.role") == "job"]) == 1
    assert exp.artifact_location == (project / "runs" / "artifacts" / "mystudy").as_uri()
    job = next(x for x in runs if x.data.tags.get("bnlab.role") == "job")
    assert job.data.tags["bnlab.version"] == bnlab.__version__
    assert "does my own grid run?" in c.get_experiment(exp.experiment_id).tags["mlflow.note.content"]


# ------------------------------------------------------------------ 4. records that reproduce

def test_runs_record_the_version_and_absolute_data_paths(project):
    assert store.git_info()["bnlab.version"] == bnlab.__version__
    assert describe.standard_tags("bnlab-train")["bnlab.version"] == bnlab.__version__
    d = DataConfig(name=DataName.tensors, path="sub/../data.npz", root="~/x")
    assert d.path == str(project / "data.npz") and d.root == str(Path.home() / "x")


def test_run_descriptions_name_every_model_and_dataset_from_the_registries():
    from bnlab.data import TITLES
    from bnlab.models import MODELS

    words = {"lenet": "LeNet", "mlp": "MLP [256, 128]", "resnet20": "ResNet-20", "custom": "your model mynets:net"}
    data_words = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "tensors": "your tensors",
                  "synthetic": "synthetic data"}
    assert set(words) == set(MODELS) and set(data_words) == {d.value for d in TITLES}
    for model in ModelName:
        for data in DataName:
            cfg = Config(model=ModelConfig(name=model, target="mynets:net" if model == ModelName.custom else None),
                         data=DataConfig(name=data, path="/d/x.npz" if data == DataName.tensors else None))
            text = describe.run_description(cfg)
            assert words[model.value] in text and f"on {data_words[data.value]}" in text, text
            others = [w for k, w in {**words, **data_words}.items() if k not in (model.value, data.value)]
            assert not any(w.split()[0] in text for w in others if w.split()[0] not in ("your",)), text


def test_a_custom_model_starts_at_a_sensible_rate_and_a_run_at_chance_is_named(project):
    cfg = cli.validate_job(["model=custom", "model.target=mynets:net"])
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.1, 0.9)
    assert cli.validate_job(["model=custom", "model.target=mynets:net", "optim.lr=0.01"]).optim.lr == 0.01
    from bnlab.train import chance_warning

    y = torch.arange(1000) % 10
    w = chance_warning(cfg, 0.101, y, 1000)
    assert w and "chance level (0.100)" in w and "optim.lr" in w and "model=custom" in w
    assert chance_warning(cfg, 0.30, y, 1000) is None
    skewed = torch.cat([torch.zeros(900, dtype=torch.long), torch.arange(100) % 10])
    assert chance_warning(cfg, 0.905, skewed, 1000)  # always guessing the big class is chance too


def test_a_custom_model_reloads_from_its_saved_source_in_another_folder(project, tmp_path, monkeypatch):
    from bnlab.load import load_run
    from bnlab.tracking import MlflowTracker
    from bnlab.train import train

    _write(project / "mynets_reload.py", MY_NETS)
    monkeypatch.syspath_prepend(str(project))
    cfg = Config(model=ModelConfig(name=ModelName.custom, target="mynets_reload:net"),
                 data=DataConfig(name=DataName.synthetic, synthetic_train=64, synthetic_val=32, batch_size=16,
                                 synthetic_shape=[3, 8, 8]))
    cfg.bn.precise_samples, cfg.train.epochs, cfg.train.bs1_samples, cfg.train.progress = 32, 1, 2, False
    uri = f"sqlite:///{project / 'runs' / 'mlflow.db'}"
    store.ensure_experiment(uri, "mine")
    tracker = MlflowTracker(uri, "mine", "one")
    train(cfg, tracker, config_text="x: 1")
    run_id = tracker.run_id
    names = [a.path for a in store.client(uri).list_artifacts(run_id, "model_source")]
    assert names == ["model_source/mynets_reload.py"]
    # The module is gone from the import path, the file deleted, and we are in another folder.
    (project / "mynets_reload.py").unlink()
    sys.modules.pop("mynets_reload", None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != project])
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    loaded = load_run(run_id, uri)
    assert loaded.config.model.target == "mynets_reload:net"
    x = torch.rand(4, 3, 8, 8)
    assert loaded.model(x).shape == (4, 10)
    assert Path(sys.modules["mynets_reload"].__file__) == project / "mynets_reload.py"  # the saved source
    sys.modules.pop("mynets_reload", None)


def test_diagnose_verdicts_name_functions_that_exist():
    import importlib

    import pandas as pd

    from bnlab.bn.diagnose import _verdict

    layers = pd.DataFrame({"layer": ["0", "1"], "mean_err": [0.9, 0.1], "var_err": [0.8, 0.1]})
    texts = [_verdict({"running": r, "batch": b, "precise": p}, layers, never, 2.0)
             for r, b, p, never in [(0.1, 0.7, 0.8, []), (0.1, 0.7, 0.8, ["0"]), (0.8, 0.5, 0.5, []),
                                    (0.8, 0.5, 0.8, []), (float("nan"),) * 3 + ([],)]]
    names = {n.rstrip(".") for t in texts for n in re.findall(r"\bbnlab(?:\.\w+)+", t)}
    assert "bnlab.bn.precise_bn" in names
    for name in names:
        module, _, attr = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_report_names_the_version_where_runs_have_no_commit():
    import pandas as pd

    from bnlab.analysis.report import commits_text

    runs = pd.DataFrame({"git_commit": ["unknown", "unknown", "a" * 40],
                         "git_dirty": pd.array([pd.NA, pd.NA, False], dtype="boolean"),
                         "tags.bnlab.version": ["0.1.0", "0.1.0", "0.1.0"]})
    text = commits_text(runs)
    assert "`bnlab 0.1.0` (installed, 2 runs)" in text and "`aaaaaaaaaaaa` (clean, 1 run)" in text


@pytest.mark.subprocess
@pytest.mark.parametrize("order", ["flags first", "flags last"])
def test_config_dir_with_hydras_own_flags_on_the_real_command_line(project, tmp_path, order):
    folder = _write(tmp_path / "elsewhere" / "study" / "mystudy.yaml", MY_STUDY).parents[1]
    flags = ["--config-dir", str(folder), "--cfg", "job"]
    args = flags + ["study=mystudy"] if order == "flags first" else ["study=mystudy"] + flags
    r = run_cli("bnlab-train", *args, home=project, cwd=project, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "experiment: mystudy" in r.stdout and not (project / "runs").exists()


def test_a_run_records_the_device_it_ran_on_and_the_report_says_it():
    import pandas as pd
    import torch

    from bnlab.analysis.report import devices_text
    from bnlab.config import Config, DataConfig, DataName, TrainConfig
    from bnlab.train import device_name, train

    class Tags:
        def __init__(self):
            self.tags = {}

        def start(self, params, tags, config_text):
            self.tags.update(tags)

        def log_epoch(self, step, metrics):
            pass

        def set_tags(self, tags):
            self.tags.update(tags)

        def end(self, status, error=None):
            pass

    t = Tags()
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=64, synthetic_val=32, batch_size=32),
                 train=TrainConfig(epochs=1, threads=1, bs1_samples=0, progress=False))
    cfg.__post_init__()
    train(cfg, t)  # train.device=auto: on this machine's CPU build, cpu
    assert t.tags["bnlab.device_used"] == device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    runs = pd.DataFrame({"tags.bnlab.device_used": ["cpu", "cpu", "cuda (NVIDIA H200)", None],
                         "tags.bnlab.train.device": ["auto", "cpu", "cuda", "auto"]})
    text = devices_text(runs)
    assert "cpu (2 runs)" in text and "cuda (NVIDIA H200) (1 run)" in text
    assert "not recorded (train.device=auto) (1 run)" in text

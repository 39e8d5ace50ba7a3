"""bnlab installed as a researcher installs it: the wheel built from this tree, in a fresh venv, used from a
temporary project folder with its own study, model and .npz data (train, report, the store line it
prints, diagnose from another folder). Synthetic sizes, 1 epoch."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path("/opt/wheels")  # where this machine keeps the torch CPU wheel (as `make setup`)

STUDY = """\
# @package _global_
# Question: does my own network learn my own data?
# Run:    bnlab-train study=mine   (2 runs, seconds)
# Report: bnlab-report study=mine
defaults:
  - override /model: custom
  - override /data: tensors
model:
  target: mynets:Net
data:
  path: data.npz
  batch_size: 32
tracking:
  experiment: mine
  study: mine
bn:
  precise_samples: 128
train:
  epochs: 1
  bs1_samples: 8
  progress: false
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      seed: 0,1
"""

NETS = """\
from torch import nn


class Net(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)
"""


def _run(cmd, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _wheel(tmp: Path, env: dict) -> Path:
    """The wheel of a copy of this tree's package files (the build writes nothing into the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bnlab", src / "bnlab", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
         tmp, env)
    (wheel,) = (tmp / "dist").glob("bnlab-*.whl")
    return wheel


def test_the_wheel_runs_a_users_own_study_from_a_project_folder(tmp_path):
    import numpy as np

    env = {k: v for k, v in os.environ.items()
           if k not in ("BNLAB_HOME", "BNLAB_CONFIG_DIR", "MLFLOW_TRACKING_URI", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    wheel = _wheel(tmp_path, env)
    venv = tmp_path / "venv"
    # A fresh venv, filled by this pip (--python: no ensurepip copy); --no-compile: no .pyc for the
    # thousands of files of torch and MLflow, only for what the commands below import.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile",
           "-c", ROOT / "constraints.txt"]
    if WHEELS.is_dir():
        pip += ["--find-links", WHEELS]
    _run(pip + [wheel], tmp_path, env, timeout=900)
    bin_ = venv / "bin"
    site = Path(_run([bin_ / "python", "-c", "import bnlab, os; print(os.path.dirname(bnlab.__file__))"],
                     tmp_path, env).stdout.strip())
    assert site.is_relative_to(venv) and (site / "conf" / "study" / "smoke.yaml").is_file()

    # The project: its own study, model and data, nothing else.
    project = tmp_path / "project"
    (project / "conf" / "study").mkdir(parents=True)
    (project / "conf" / "study" / "mine.yaml").write_text(STUDY)
    (project / "mynets.py").write_text(NETS)
    rng = np.random.default_rng(0)
    y_tr, y_va = rng.integers(0, 4, 256), rng.integers(0, 4, 64)
    # Learnable: the class sets the mean of the first channel.
    x_tr = rng.normal(size=(256, 3, 8, 8)).astype("float32") + y_tr[:, None, None, None] * np.eye(3)[0][None, :, None, None]
    x_va = rng.normal(size=(64, 3, 8, 8)).astype("float32") + y_va[:, None, None, None] * np.eye(3)[0][None, :, None, None]
    np.savez(project / "data.npz", x_train=x_tr.astype("float32"), y_train=y_tr, x_val=x_va.astype("float32"),
             y_val=y_va)

    # (the study listing of --help, the project's studies beside the packaged ones: test_project.py)
    r = _run([bin_ / "bnlab-train", "study=mine"], project, env)
    assert "2 finished, 0 failed" in r.stdout, r.stdout[-2000:]
    store = project / "runs" / "mlflow.db"
    assert store.is_file() and (project / "runs" / "hydra").is_dir()
    assert not (site / "runs").exists()  # nothing generated inside the installed package
    hint = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", r.stdout).group(1)

    rep = _run([bin_ / "bnlab-report", "study=mine"], project, env)
    section = (project / "results" / "mine" / "section.md").read_text()
    assert "does my own network learn my own data?" in section and "2 used in the means" in section
    assert "bnlab 0.1.0" in section  # the version stands in for a commit an installed package lacks
    assert "wrote" in rep.stdout and not (site / "results").exists()

    # The one line bnlab-train printed names the store relative to the project folder, where users
    # type it (MLflow's own CLI on such a line: test_ui.py).
    assert hint == "sqlite:///runs/mlflow.db"

    # bnlab-diagnose from another folder, where mynets.py is not importable: the saved source is used.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert len(c.search_runs(["1"])) == 3  # the sweep's parent and its two runs
    job = next(x for x in c.search_runs([c.get_experiment_by_name("mine").experiment_id])
               if x.data.tags.get("bnlab.role") == "job")
    assert job.data.params["data.path"] == str(project / "data.npz")
    assert job.data.tags["bnlab.version"] == "0.1.0" and job.data.tags["bnlab.git_commit"] == "unknown"
    assert "your model mynets:Net" in job.data.tags["mlflow.note.content"]
    d = _run([bin_ / "bnlab-diagnose", job.info.run_id, f"tracking.uri=sqlite:///{store}",
              "--num-samples", "128"], elsewhere, env)
    assert f"run {job.info.run_id}: model=custom data=tensors" in d.stdout, d.stdout

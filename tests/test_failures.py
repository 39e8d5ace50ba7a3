"""Failures that show: a grid point that fails at run time leaves a FAILED run, the sweep runs the
others, prints its counts, ends its parent FAILED and exits 1; resume retries it. A finite but
exploding loss is a divergence. The report never replaces a committed section with a poorer one."""
from __future__ import annotations

import pytest

from pathlib import Path

from conftest import cli, runs_of, store_uri

FAST = ["train.threads=1"]
# A layer of 10^12 units: the allocation is refused at once (about 3 PB); preflight builds every
# model, so this is refused before anything is written.
HUGE = "[1000000000000]"
# A researcher's model that passes every up-front check (it evaluates fine) but fails in training:
# the run-time failure of a grid point.
FAULTY = """
from torch import nn


class Net(nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        if self.training and self.fail:
            raise RuntimeError("planted fault: this model cannot train")
        return self.body(x)


def good():
    return Net(False)


def bad():
    return Net(True)
"""
SMALL = ["data=synthetic", "data.synthetic_train=256", "data.synthetic_val=64", "data.batch_size=32",
         "bn.precise_samples=64", "train.bs1_samples=4"]


def _faulty(home: Path) -> dict:
    (home / "faultynet.py").write_text(FAULTY)
    return {"PYTHONPATH": str(home)}


def _kids(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "job"]


def _parents(runs):
    return [r for r in runs if r.data.tags.get("bnlab.role") == "sweep"]


@pytest.mark.usefixtures("store_home")
def test_a_failing_grid_point_is_counted_recorded_and_retried(home, run_cli):
    args = ["-m", "model=custom", "model.target=faultynet:good,faultynet:bad", *SMALL, "train.epochs=1",
            "tracking.experiment=fail", *FAST]
    env = _faulty(home)
    r = run_cli("bnlab-train", *args, home=home, env=env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "bnlab-train: 1 finished, 1 failed, 0 skipped, 0 diverged" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    _, runs = runs_of(home, "fail")
    kids = {k.data.params.get("model.target"): k for k in _kids(runs)}
    assert kids["faultynet:good"].info.status == "FINISHED"
    bad = kids["faultynet:bad"]
    assert bad.info.status == "FAILED" and "planted fault" in bad.data.tags["bnlab.error"]
    (parent,) = _parents(runs)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["bnlab.jobs_finished"] == "1" and parent.data.tags["bnlab.jobs_failed"] == "1"
    assert parent.data.tags["bnlab.summary"].startswith("1 finished, 1 failed, 0 skipped, 0 diverged")
    # resume: the finished point is skipped, the failed one tried again (and fails again)
    r = run_cli("bnlab-train", *args, home=home, env=env)
    assert r.returncode == 1
    assert "bnlab-train: 0 finished, 1 failed, 1 skipped, 0 diverged" in r.stdout
    _, runs = runs_of(home, "fail")
    assert sorted(k.info.status for k in _kids(runs)) == ["FAILED", "FAILED", "FINISHED"]


def test_a_model_that_cannot_be_built_is_refused_up_front(home, run_cli):
    r = run_cli("bnlab-train", "data=synthetic", "model=mlp", f"model.hidden={HUGE}", "tracking.experiment=one", *FAST,
            home=home)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be built" in lines[0] and "allocate" in lines[0], r.stderr[-2000:]
    assert not (home / "runs" / "mlflow.db").exists()


@pytest.mark.usefixtures("store_home")
def test_a_single_run_failing_in_training_leaves_a_failed_run(home, run_cli):
    r = run_cli("bnlab-train", "model=custom", "model.target=faultynet:bad", *SMALL, "tracking.experiment=one", *FAST,
            home=home, env=_faulty(home))
    assert r.returncode == 1
    _, runs = runs_of(home, "one")
    (run,) = runs
    assert run.info.status == "FAILED" and "planted fault" in run.data.tags["bnlab.error"]
    assert run.data.params["model.target"] == "faultynet:bad"  # the config is recorded with the failure


@pytest.mark.usefixtures("store_home")
def test_a_finite_exploding_loss_is_a_divergence(home, run_cli):
    # the sigmoid LeNet at lr 1e6: the loss stays finite (millions) but the run learns nothing
    r = run_cli("bnlab-train", "-m", "data=synthetic", "optim.lr=1e6,0.5", "train.epochs=2",
            "tracking.experiment=div", *FAST, home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bnlab-train: 1 finished, 0 failed, 0 skipped, 1 diverged" in r.stdout
    _, runs = runs_of(home, "div")
    by_lr = {k.data.params["optim.lr"]: k for k in _kids(runs)}
    boom = by_lr["1000000.0"]
    loss = boom.data.metrics["train/loss"]
    assert 100 < loss < float("inf"), loss
    assert boom.data.tags["bnlab.diverged"] == "true" and boom.data.tags["bnlab.diverged_epoch"] == "1"
    assert by_lr["0.5"].data.tags["bnlab.diverged"] == "false"
    # left out of the means like a NaN run
    from bnlab.analysis import figures as F
    from bnlab.analysis.runs import load_runs

    frame = load_runs("div", store_uri(home))
    ok, _, n_div = F.split_runs(frame)
    assert n_div == 1 and list(ok["optim.lr"]) == [0.5]


@pytest.mark.usefixtures("store_home")
def test_the_report_keeps_a_richer_section_unless_forced(home, tmp_path, run_cli):
    out = tmp_path / "results"
    r = run_cli("bnlab-train", "study=smoke", *FAST, home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("bnlab-report", "study=smoke", f"out={out}", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "REPORT.md").read_text()
    assert "4 used in the means" in report
    assert "sqlite:///runs/mlflow.db" in report and str(home) not in report  # no absolute path of this machine
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # another store where every smoke run FAILED
    other = tmp_path / "other"
    other.mkdir()
    r = run_cli("bnlab-train", "study=smoke", "model=custom", "model.target=faultynet:bad", *FAST, home=other,
            env=_faulty(other))
    assert r.returncode == 1
    assert "0 finished, 4 failed" in r.stdout
    r = run_cli("bnlab-report", "study=smoke", f"out={out}", home=other)
    assert r.returncode == 1
    assert "kept" in r.stderr and "--force" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # written elsewhere: works
    r = run_cli("bnlab-report", "study=smoke", f"out={tmp_path / 'elsewhere'}", home=other)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 used in the means" in (tmp_path / "elsewhere" / "smoke" / "section.md").read_text()
    # asked explicitly
    r = run_cli("bnlab-report", "study=smoke", f"out={out}", "--force", home=other)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 runs, 0 used in the means" in (out / "smoke" / "section.md").read_text()


def test_report_of_an_unknown_study_exits_non_zero_with_the_list(home, run_cli):
    r = run_cli("bnlab-report", "study=doesnotexist", home=home)
    assert r.returncode == 2
    assert "doesnotexist" in r.stderr and "smoke" in r.stderr and "update_ops" in r.stderr
    assert not (home / "results").exists()


def test_help_of_the_report_mentions_force(home, run_cli):
    r = run_cli("bnlab-report", "--help", home=home)
    assert r.returncode == 0 and "--force" in r.stdout
    assert not Path(home / "results").exists()


def test_committed_report_names_the_store_relative_to_the_project():
    results = Path(__file__).resolve().parents[1] / "results"
    texts = [p.read_text() for p in [results / "REPORT.md", *results.glob("*/section.md")] if p.is_file()]
    if not texts:
        import pytest

        pytest.skip("no committed report")
    for t in texts:
        for line in t.splitlines():
            if line.startswith("- Store: "):
                assert "sqlite:////" not in line and "/home/" not in line, line

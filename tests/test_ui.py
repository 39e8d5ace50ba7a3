"""bnlab-ui against a temporary store after a smoke sweep and its report, over the REST API on a
loopback port: what it prints, experiment descriptions, run names, standard tags, the parent's
params and report artifacts; a port in use, the --host warning, SIGINT/SIGTERM leave nothing behind."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from bnlab import describe as D
from bnlab import ui as bui
from bnlab.roles import Role, field_role
from conftest import BIN, ROOT, UI, in_process, main_exit

FAST = ["train.threads=1"]


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def group_members(pgid: int, running: bool = False) -> list[int]:
    """The pids of a process group, from /proc; with running=True without zombies (an orphan that
    has exited stays a zombie where PID 1 does not reap, as in some containers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        if int(fields[2]) == pgid and not (running and fields[0] == "Z"):  # state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


def wait_all_exit(pids: list[int], timeout: float) -> None:
    """Wait for each process's exit event (a pidfd becomes readable when it ends); `timeout` is only
    a safety limit, and passing it fails loudly."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # already gone
    try:
        for fd in fds:
            assert select.select([fd], [], [], timeout)[0], "a server process outlived a SIGKILLed bnlab-ui"
    finally:
        for fd in fds:
            os.close(fd)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A smoke sweep (`bnlab-train study=smoke`, a Hydra multirun) and `bnlab-report`, each the
    console script's main in this process (what they print is the setup's captured output), in a
    temporary home; then bnlab-ui, a real process, over that store."""
    home = tmp_path_factory.mktemp("uihome")
    assert in_process("bnlab-train", "study=smoke", *FAST, home=home) == 0, "bnlab-train failed: its output is above"
    assert in_process("bnlab-report", "study=smoke", f"out={home / 'results'}", home=home) == 0, \
        "bnlab-report failed: its output is above"
    ui = UI(home)
    ui.wait_for(r"^export MLFLOW_TRACKING_URI=")
    yield ui, home
    ui.kill()


def _experiment(ui, name="smoke"):
    return ui.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=name)["experiment"]


def _runs(ui, exp_id):
    return ui.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 1000})["runs"]


def _tags(entity) -> dict:
    return {t["key"]: t["value"] for t in entity.get("tags", []) or entity.get("data", {}).get("tags", [])}


def _split(runs):
    parents = [r for r in runs if _tags(r).get("bnlab.role") == "sweep"]
    kids = [r for r in runs if _tags(r).get("bnlab.role") == "job"]
    return parents, kids


@pytest.mark.subprocess
def test_ui_prints_the_runs_table_url_and_the_tracking_uri_line(served):
    ui, home = served
    exp = _experiment(ui)
    url = ui.wait_for(r"^\s+smoke\s+(\S+)$").group(1)
    assert url == f"{ui.base}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning&viewStateShareKey=bnlab"
    line = ui.wait_for(r"^export MLFLOW_TRACKING_URI=(\S+)$").group(1)
    assert line == f"sqlite:///{home / 'runs' / 'mlflow.db'}"
    # the printed line points MLflow's own CLI at the same store, from any directory
    out = subprocess.run([str(BIN / "mlflow"), "runs", "list", "--experiment-id", exp["experiment_id"]],
                         capture_output=True, text=True, cwd=str(home), env={**os.environ, "MLFLOW_TRACKING_URI": line},
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "update=off s=1" in out.stdout and re.search(r"smoke \d\d-\d\d \d\d:\d\d", out.stdout)
    # the page itself is served
    assert b"<html" in ui.get("/").lower()


@pytest.mark.subprocess
def test_experiment_description_and_study_view(served):
    ui, _ = served
    tags = _tags(_experiment(ui))
    note = tags["mlflow.note.content"]
    question = D.study_header("smoke")["Question"]
    assert question.startswith("does the whole pipeline") and question in note
    assert "`bnlab-train study=smoke` (4 runs)" in note and "`bnlab-report study=smoke`" in note
    assert "## smoke" in note and "results/REPORT.md" in note
    view = json.loads(tags["mlflow.sharedViewState.bnlab"])
    assert view["selectedColumns"][:5] == ["params.`bn.update_stats`", "params.`seed`", "metrics.`val/acc`",
                                           "metrics.`val/acc_precise_bn`", "metrics.`gap/acc`"]


@pytest.mark.subprocess
def test_run_names_are_short_unique_and_show_what_varies(served):
    ui, _ = served
    parents, kids = _split(_runs(ui, _experiment(ui)["experiment_id"]))
    names = sorted(k["info"]["run_name"] for k in kids)
    assert names == ["update=off s=0", "update=off s=1", "update=on s=0", "update=on s=1"]
    assert len({n[:20] for n in names}) == 4
    (parent,) = parents
    assert re.fullmatch(r"smoke \d\d-\d\d \d\d:\d\d", parent["info"]["run_name"])
    for k in kids:
        p = {x["key"]: x["value"] for x in k["data"]["params"]}
        assert p["bn.update_stats"].lower() == ("true" if "update=on" in k["info"]["run_name"] else "false")
        assert p["seed"] == k["info"]["run_name"][-1]


@pytest.mark.subprocess
def test_standard_tags_on_every_run(served):
    ui, _ = served
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    runs = _runs(ui, _experiment(ui)["experiment_id"])
    assert len(runs) == 5
    for r in runs:
        t = _tags(r)
        assert t["mlflow.source.name"] == "bnlab-train study=smoke" and t["mlflow.user"]
        assert t["mlflow.source.type"] == "LOCAL"
        if head.returncode == 0:
            assert t["mlflow.source.git.commit"] == head.stdout.strip()
        assert t["mlflow.note.content"] and "\n" not in t["mlflow.note.content"]
    _, kids = _split(runs)
    notes = {_tags(k)["mlflow.note.content"] for k in kids}
    assert len(notes) == 4 and sum("never updated" in n for n in notes) == 2


@pytest.mark.subprocess
def test_params_define_the_run_and_the_parent_holds_the_shared_ones(served):
    ui, _ = served
    parents, kids = _split(_runs(ui, _experiment(ui)["experiment_id"]))
    (parent,) = parents
    pp = {x["key"]: x["value"] for x in parent["data"].get("params", [])}
    # smoke.yaml's fixed settings, not the varying keys, not bookkeeping
    assert pp["data.synthetic_train"] == "512" and pp["data.batch_size"] == "32" and pp["train.epochs"] == "1"
    assert "seed" not in pp and "bn.update_stats" not in pp
    for k in kids:
        kp = {x["key"]: x["value"] for x in k["data"]["params"]}
        assert not {k for k in kp if field_role(k).role in (Role.execution, Role.bookkeeping)}
        assert set(kp) == set(pp) | {"seed", "bn.update_stats"}
        assert all(kp[key] == v for key, v in pp.items())
        assert _tags(k)["bnlab.threads"] == "1"  # bookkeeping kept as a tag
    assert "Sweep of `smoke`: 4 runs varying bn.update_stats, seed" in _tags(parent)["mlflow.note.content"]


@pytest.mark.subprocess
def test_report_is_attached_to_the_sweep_run(served):
    ui, home = served
    parents, _ = _split(_runs(ui, _experiment(ui)["experiment_id"]))
    run_id = parents[0]["info"]["run_id"]
    listed = ui.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="report")
    files = {Path(f["path"]).name for f in listed.get("files", [])}
    assert {"summary.csv", "section.md", "curves.png", "curves.svg"} <= files
    body = ui.get("/get-artifact", path="report/summary.csv", run_uuid=run_id)
    assert body == (home / "results" / "smoke" / "summary.csv").read_bytes()


def test_port_in_use_is_one_line_and_a_nonzero_exit(home, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main_exit(bui.main, "--port", str(port))
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"bnlab-ui: error: port {port} on 127.0.0.1 is in use (another bnlab-ui? pick one with --port)"]
    assert not (home / "runs").exists()  # nothing started, nothing written


def test_public_host_warns_that_the_ui_has_no_authentication(home, capsys):
    assert bui.host_warning("127.0.0.1") is None and bui.host_warning("localhost") is None
    assert bui.host_warning("::1") is None
    # the warning path of the real command, without ever serving on every interface: the port is taken
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main_exit(bui.main, "--host", "0.0.0.0", "--port", str(port))
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == bui.host_warning("0.0.0.0") and "no authentication" in lines[0]
    assert "is in use" in lines[1] and len(lines) == 2


def test_bad_port_is_refused_before_anything_runs(home, capsys):
    assert main_exit(bui.main, "--port", "70000") == 2
    assert capsys.readouterr().err.strip() == "bnlab-ui: error: --port must be in 1..65535, got 70000"
    assert main_exit(bui.main, "--workers", "0") == 2


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_sigint_stops_the_server_and_its_process_group(home):
    ui = UI(home)
    try:
        pgid = ui.server_pid()
        ui.wait_for(r"no experiments yet")
        ui.proc.send_signal(signal.SIGINT)
        assert ui.proc.wait(60) == 0
    finally:
        ui.kill()
    assert group_gone(pgid) and port_free(ui.port)


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_sigkill_of_bnlab_ui_still_stops_its_server(home):
    ui, pgid = UI(home), None
    try:
        pgid = ui.server_pid()
        ui.wait_for(r"^export MLFLOW_TRACKING_URI=")
        members = group_members(pgid)
        assert pgid in members
        ui.proc.kill()  # SIGKILL: no handler runs in bnlab-ui
        ui.proc.wait(30)
        wait_all_exit(members, timeout=60)  # the kernel's SIGTERM (PR_SET_PDEATHSIG) stops them
        assert group_members(pgid, running=True) == [] and port_free(ui.port)
    finally:
        ui.kill()
        if pgid and group_members(pgid, running=True):
            os.killpg(pgid, signal.SIGKILL)


@pytest.mark.subprocess
def test_sigterm_leaves_no_process_on_the_port(served):
    # last in this file: it stops the module's server
    ui, _ = served
    pgid = ui.server_pid()
    assert not port_free(ui.port) and not group_gone(pgid)
    ui.proc.send_signal(signal.SIGTERM)
    assert ui.proc.wait(60) == 0
    assert group_gone(pgid) and port_free(ui.port)
    ui.reader.join(30)  # the reader drains the pipe to its end
    assert not ui.reader.is_alive() and "bnlab-ui: stopped (SIGTERM)" in ui.lines, "\n".join(ui.lines)

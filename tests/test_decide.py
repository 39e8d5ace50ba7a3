"""bnlab-decide: the loop of rounds with every side channel injected (fast), then real small sweeps of the
smoke study (synthetic data, 1 epoch) into a temporary store: stop on a decision, stop on the seed and
time budgets, resume after an interruption injected at a named step."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pandas as pd
import pytest

from bnlab import decide as D
from bnlab.analysis import verdicts as V

from conftest import runs_of, store_uri


# ------------------------------------------------------------------------------ the loop, injected

class FakeStudy:
    """A store whose runs are the seeds launched so far; one claim decided once `decide_at` seeds are in."""

    def __init__(self, decide_at=None, fail_round=None, clock_per_round=10.0):
        self.seeds, self.launched, self.records = set(), [], []
        self.decide_at, self.fail_round = decide_at, fail_round
        self.now, self.per_round = 0.0, clock_per_round

    def launch(self, seeds):
        self.launched.append(list(seeds))
        self.now += self.per_round
        if self.fail_round is not None and len(self.launched) == self.fail_round:
            return 1
        self.seeds |= set(seeds)
        return 0

    def observe(self):
        return pd.DataFrame({"seed": sorted(self.seeds)}), pd.DataFrame()

    def complete(self, runs, seeds):
        return set(runs["seed"]) & set(seeds) if not runs.empty else set()

    def evaluate(self, runs, curves):
        n = len(runs)
        ok = None if self.decide_at is None or n < self.decide_at else True
        return [types.SimpleNamespace(claim="the claim", decision=V.from_bool(ok, "rule", n=n))]

    def run(self, plan, **kw):
        args = dict(launch=self.launch, observe=self.observe, complete=self.complete, evaluate=self.evaluate,
                    record=self.records.append, clock=lambda: self.now, out=lambda line: None)
        args.update(kw)
        return D.run_rounds(plan, **args)


def test_stops_when_every_claim_is_decided():
    f = FakeStudy(decide_at=6)
    out = f.run(D.Plan("s", max_seeds=20, seeds_per_round=2))
    assert out.stopped == D.STOP_DECIDED
    assert f.launched == [[0, 1], [2, 3], [4, 5]]
    assert out.rounds_trained == 3 and out.seeds == list(range(6))
    assert any("round 3 (seeds 4,5): 6 seeds so far; 1 of 1 claims decided (1 holds), 0 undecided" in line
               for line in out.lines)


def test_stops_when_the_seed_budget_is_spent():
    f = FakeStudy(decide_at=None)
    out = f.run(D.Plan("s", max_seeds=5, seeds_per_round=2))
    assert out.stopped == D.STOP_SEEDS and f.launched == [[0, 1], [2, 3], [4]]
    assert "1 undecided" in out.lines[-2]


def test_stops_before_a_round_that_would_end_after_the_time_budget():
    f = FakeStudy(decide_at=None, clock_per_round=100.0)
    out = f.run(D.Plan("s", max_seeds=20, seeds_per_round=2, max_minutes=4))
    assert out.stopped == D.STOP_TIME and len(f.launched) == 2  # 200 s, and a third round would end at 300 s
    # the time of earlier invocations counts: 240 s recorded leaves nothing of the 4 minutes
    g = FakeStudy(decide_at=None, clock_per_round=100.0)
    out = g.run(D.Plan("s", max_seeds=20, seeds_per_round=2, max_minutes=4), prior_wall_s=240.0)
    assert out.stopped == D.STOP_TIME and g.launched == []
    assert g.records[-1]["wall_s"] == 240.0


def test_a_failed_round_stops_with_its_status():
    f = FakeStudy(decide_at=None, fail_round=2)
    out = f.run(D.Plan("s", max_seeds=20, seeds_per_round=2))
    assert out.stopped == D.STOP_FAILED and len(f.launched) == 2 and out.status == 1
    assert "exited with status 1" in out.lines[-2]


def test_an_interruption_at_a_named_step_resumes_without_relaunching_finished_rounds():
    f = FakeStudy(decide_at=6)

    def stop(name, r):
        if (name, r) == ("round_trained", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        f.run(D.Plan("s", max_seeds=20, seeds_per_round=2), step=stop)
    assert f.launched == [[0, 1], [2, 3]] and "interrupted" in f.records[-1]["last"]
    out = f.run(D.Plan("s", max_seeds=20, seeds_per_round=2), prior_wall_s=f.records[-1]["wall_s"])
    assert f.launched == [[0, 1], [2, 3], [4, 5]] and out.stopped == D.STOP_DECIDED
    assert out.lines[0].startswith("in the store before the first round: 4 seeds so far")


def test_claims_that_cannot_be_computed_are_reported_and_the_rounds_go_on():
    f = FakeStudy()

    def broken(runs, curves):
        raise KeyError("final/val/acc")

    f.evaluate = broken
    out = f.run(D.Plan("s", max_seeds=4, seeds_per_round=2))
    assert out.stopped == D.STOP_SEEDS and len(f.launched) == 2
    assert "round 1 (seeds 0,1): the claims could not be computed: KeyError: 'final/val/acc'" in out.lines


def test_no_claims_yet_is_not_a_decision():
    f = FakeStudy()
    f.evaluate = lambda runs, curves: []
    out = f.run(D.Plan("s", max_seeds=4, seeds_per_round=2))
    assert out.stopped == D.STOP_SEEDS and len(f.launched) == 2


@pytest.mark.parametrize("argv,message", [
    (["max_seeds=4"], "study must be given"),
    (["study=smoke"], "max_seeds must be given"),
    (["study=smoke", "max_seeds=1"], "max_seeds must be an integer >= 2, got '1'"),
    (["study=smoke", "max_seeds=4", "seeds_per_round=0"], "seeds_per_round must be an integer >= 1"),
    (["study=smoke", "max_seeds=4", "max_minutes=soon"], "max_minutes must be a number > 0"),
    (["study=smoke", "max_seeds=4", "seed=3,4"], "seed: bnlab-decide chooses the seeds"),
])
def test_bad_arguments_are_one_line_naming_the_field(argv, message):
    with pytest.raises(D.UsageError, match=message):
        D.parse_args(argv)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(home, capsys):
    for argv in (["study=nope", "max_seeds=4"], ["study=smoke", "max_seeds=4", "bn.momentum=2"]):
        assert D.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bnlab-decide: error: ")
    assert "bn.momentum must be in [0, 1]" in err[0]
    assert not any(home.iterdir())


def test_overrides_reach_every_round_and_the_study_keeps_its_grid():
    plan = D.parse_args(["study=gamma_beta", "max_seeds=6", "seeds_per_round=3", "train.epochs=1",
                         "hydra/launcher=joblib"])
    assert plan.rounds() == [[0, 1, 2], [3, 4, 5]]
    cmd = D.sweep_command(plan, [3, 4, 5])
    assert cmd[-4:] == ["study=gamma_beta", "seed=3,4,5", "train.epochs=1", "hydra/launcher=joblib"]


def test_the_claims_adapter_reads_every_verdict_sequentially(monkeypatch):
    seen = {}

    def evaluate_claims(study, runs, curves):
        seen["method"] = V.current_method()
        return [types.SimpleNamespace(claim="c", measured="m", decision=V.above([0.1, 0.2, 0.3, 0.2, 0.25]))]

    mod = types.ModuleType("bnlab.analysis.study")
    mod.__spec__ = importlib.machinery.ModuleSpec("bnlab.analysis.study", None)
    mod.evaluate_claims = evaluate_claims
    monkeypatch.setitem(sys.modules, "bnlab.analysis.study", mod)
    claims = D.study_claims("gamma_beta", pd.DataFrame({"run_id": ["a"]}), pd.DataFrame())
    assert seen["method"] == V.SEQUENTIAL and claims[0].decision.method == V.CS_METHOD
    assert V.current_method() == V.FIXED


# ------------------------------------------------------------------------------ real sweeps

def _train_acc_claim(study, runs, curves):
    """An injected claim on the real runs: train/acc with BN updates on is above 0.2 (chance is 0.1)."""
    ok = runs[runs["status"].eq("FINISHED") & runs["bn.update_stats"].eq(True)]
    return [types.SimpleNamespace(claim="train/acc above 0.2", measured="",
                                  decision=V.above(ok["final/train/acc"], 0.2, "mean above 0.2"))]


def _never_decided(study, runs, curves):
    return [types.SimpleNamespace(claim="undecidable", measured="", decision=V.from_bool(None, "no data"))]


SMOKE = ["train.threads=1"]


def _runs(home):
    from bnlab.analysis.runs import load_runs

    return load_runs("smoke", store_uri(home))


def _trained(home, status: str = "FINISHED") -> list:
    """Config hash of every job run with that status in the raw store (no de-duplication)."""
    _, runs = runs_of(home, "smoke")
    return [r.data.tags.get("bnlab.config_hash") for r in runs
            if r.data.tags.get("bnlab.role") == "job" and r.info.status == status]


@pytest.mark.parametrize("child", ["import os, signal; os.kill(os.getpid(), signal.SIGINT)", "raise SystemExit(130)"])
def test_a_round_whose_sweep_was_interrupted_interrupts_bnlab_decide(monkeypatch, child):
    """A sweep ended by Ctrl-C (killed by SIGINT, or bnlab-train's exit 130) is an interruption of
    bnlab-decide too, even where its own KeyboardInterrupt was lost; any other status is returned."""
    plan = D.parse_args(["study=smoke", "max_seeds=2"])
    monkeypatch.setattr(D, "sweep_command", lambda plan_, seeds: [sys.executable, "-c", child])
    with pytest.raises(KeyboardInterrupt):
        D.launch_sweep(plan, [0])
    monkeypatch.setattr(D, "sweep_command", lambda plan_, seeds: [sys.executable, "-c", "raise SystemExit(1)"])
    assert D.launch_sweep(plan, [0]) == 1


def _rounds_in_this_process(run_cli, home):
    """launch_sweep's round (the bnlab-train command line bnlab-decide builds) run in this process:
    what the rounds decide does not depend on processes; the Ctrl-C test below interrupts bnlab-decide and
    its sweeps as processes."""

    def launch(plan, seeds):
        cmd = D.sweep_command(plan, seeds)
        assert cmd[:2] == [sys.executable, "-c"]
        return run_cli("bnlab-train", *cmd[3:], home=home).returncode

    return launch


@pytest.mark.slow
@pytest.mark.usefixtures("store_home")
def test_real_rounds_decide_and_resume_after_an_interruption_inside_a_round(home, run_cli):
    plan = D.parse_args(["study=smoke", "max_seeds=12", "seeds_per_round=3", *SMOKE])
    launched, launch_sweep = [], _rounds_in_this_process(run_cli, home)

    def launch_then_stop(plan_, seeds):
        """Round 2 is interrupted after its first seed trained (a named step, not a timing window)."""
        launched.append(list(seeds))
        if seeds[0] == 3:
            assert launch_sweep(plan_, seeds[:1]) == 0
            raise KeyboardInterrupt
        return launch_sweep(plan_, seeds)

    lines = []
    with pytest.raises(KeyboardInterrupt):
        D.decide(plan, evaluate=_train_acc_claim, launch=launch_then_stop, out=lines.append)
    before = _runs(home)
    assert sorted(before["seed"]) == [0, 0, 1, 1, 2, 2, 3, 3] and before["status"].eq("FINISHED").all()
    assert any("round 1 (seeds 0-2): 3 seeds so far; 0 of 1 claims decided, 1 undecided" in x for x in lines)

    def launch(plan_, seeds):
        launched.append(list(seeds))
        return launch_sweep(plan_, seeds)

    lines = []
    out = D.decide(plan, evaluate=_train_acc_claim, launch=launch, out=lines.append)
    assert launched == [[0, 1, 2], [3, 4, 5], [4, 5]]  # only what round 2 still lacked
    after = _runs(home)
    kept = after[after["run_id"].isin(before["run_id"])]
    assert len(kept) == len(before) and len(after) == 12
    assert len(_trained(home)) == 12 and len(set(_trained(home))) == 12  # nothing trained twice
    assert _trained(home, "KILLED") == []  # the interruption came between sweeps
    assert out.stopped == D.STOP_DECIDED and out.seeds == list(range(6))
    d = out.claims[0].decision
    assert d.verdict == V.HOLDS and d.n == 6 and d.method == V.CS_METHOD and d.lo > 0.2
    assert lines[0].startswith("[decide smoke] in the store before the first round: 4 seeds so far")
    # every run of the grid is marked for the report, and the time of both invocations is recorded
    assert after["tags." + V.VERDICTS_TAG].eq(V.SEQUENTIAL).all()
    assert V.method_for(after) == V.SEQUENTIAL
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(store_uri(home)).get_experiment_by_name("smoke").tags
    assert float(tags[D.TAG_WALL]) == pytest.approx(out.wall_s, abs=0.1) and int(tags[D.TAG_ROUNDS]) == 3
    note = D.summary("smoke", store_uri(home))
    assert note.startswith("bnlab-decide: 3 rounds, ") and "stopped: every claim is decided" in note
    assert D.summary("gamma_beta", store_uri(home)) is None


@pytest.mark.slow
@pytest.mark.usefixtures("store_home")
def test_real_rounds_stop_on_the_seed_budget_then_on_the_recorded_time(home, run_cli):
    plan = D.parse_args(["study=smoke", "max_seeds=2", "seeds_per_round=2", *SMOKE])
    out = D.decide(plan, evaluate=_never_decided, launch=_rounds_in_this_process(run_cli, home),
                   out=lambda line: None)
    assert out.stopped == D.STOP_SEEDS and out.rounds_trained == 1
    assert sorted(_runs(home)["seed"]) == [0, 0, 1, 1]
    # More seeds allowed, but the time already spent (recorded in the store) exceeds max_minutes.
    plan = D.parse_args(["study=smoke", "max_seeds=6", "max_minutes=0.05", *SMOKE])
    launched = []
    out = D.decide(plan, evaluate=_never_decided, launch=lambda p, s: launched.append(s) or 0,
                   out=lambda line: None)
    assert out.stopped == D.STOP_TIME and launched == [] and out.wall_s > 3.0


@pytest.mark.subprocess
@pytest.mark.usefixtures("store_home")
def test_ctrl_c_stops_bnlab_decide_and_the_same_command_resumes(home, run_cli, monkeypatch):
    """A terminal's Ctrl-C (SIGINT to the whole process group) once round 1 has been reported, wherever
    in round 2 it lands: exit 130, then the same command finishes with every grid point trained once."""
    import os
    import signal
    import subprocess

    from conftest import BIN

    args = ["study=smoke", "max_seeds=4", *SMOKE]
    env = {**os.environ, "BNLAB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN / "bnlab-decide"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(home), start_new_session=True)
    try:
        for line in proc.stdout:  # the explicit signal: round 1's line
            if line.startswith("[decide smoke] round 1 (seeds 0,1)"):
                break
        else:
            pytest.fail(f"no round line; stderr: {proc.stderr.read()[-2000:]}")
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (rest[-1500:], err[-3000:])
    assert "interrupted; rerun the same command to resume" in err
    first = _runs(home)
    round1 = set(first.loc[first["seed"].isin([0, 1]) & first["status"].eq("FINISHED"), "run_id"])
    assert len(round1) == 4
    # The same command again, in this process, its round's sweep too (what is resumed is in the
    # store: the processes the Ctrl-C stopped are above).
    from conftest import in_process

    monkeypatch.setattr(D, "launch_sweep", lambda plan, seeds: in_process(
        "bnlab-train", *D.sweep_command(plan, seeds)[3:], home=home))
    done = run_cli("bnlab-decide", *args, home=home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped: the seed budget is spent (max_seeds=4)" in done.stdout
    runs = _runs(home)
    fin = runs[runs["status"].eq("FINISHED")]
    assert len(fin) == 8 and round1 <= set(fin["run_id"])
    # every grid point FINISHED exactly once; at most the one run training at the Ctrl-C was KILLED
    # (the basic launcher trains one job at a time) and then trained again
    assert len(_trained(home)) == 8 and len(set(_trained(home))) == 8
    assert len(_trained(home, "KILLED")) <= 1
    assert not runs["status"].eq("RUNNING").any()


# ------------------------------------------------------------------ a Ctrl-C inside the store writes

def test_a_ctrl_c_inside_sigint_deferred_lands_when_the_block_ends():
    import signal

    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with D.sigint_deferred():
            signal.raise_signal(signal.SIGINT)  # in this thread, now: its handler runs at once
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is before
    with D.sigint_deferred():  # no signal, no interrupt
        done.append("quiet")
    assert done[-1] == "quiet"


def test_a_ctrl_c_inside_sigint_deferred_is_not_lost_when_the_block_fails():
    import signal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as got:
        with D.sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            raise OSError("the store write failed")
    assert isinstance(got.value.__context__, OSError) and "the store write failed" in str(got.value.__context__)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(OSError):  # without a Ctrl-C the block's error is what comes out
        with D.sigint_deferred():
            raise OSError("the store write failed")
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.usefixtures("store_home")
def test_a_ctrl_c_while_a_round_is_recorded_takes_effect_after_every_write(home, run_cli, monkeypatch):
    """The Ctrl-C arrives at the first of record()'s writes (a named step: the first experiment
    tag): every tag is still written, then KeyboardInterrupt, and the store takes the next write."""
    import signal

    from bnlab import store as bstore

    r = run_cli("bnlab-train", "study=smoke", "seed=0", *SMOKE, home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    ss = D.StudyStore(D.parse_args(["study=smoke", "max_seeds=2", *SMOKE]))
    real = bstore.client

    def client(uri):
        c = real(uri)
        inner = c.set_experiment_tag
        fired = []

        def set_experiment_tag(*a, **k):
            if not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)
            return inner(*a, **k)

        c.set_experiment_tag = set_experiment_tag
        return c

    monkeypatch.setattr(bstore, "client", client)
    with pytest.raises(KeyboardInterrupt):
        ss.record({"wall_s": 12.0, "new_rounds": 1, "last": "round 1 (seeds 0): recorded"}, "round 1")
    monkeypatch.setattr(bstore, "client", real)
    tags = real(store_uri(home)).get_experiment_by_name("smoke").tags
    assert tags[D.TAG_WALL] == "12.0" and tags[D.TAG_LAST] == "round 1 (seeds 0): recorded"
    _, runs = runs_of(home, "smoke")
    jobs = [x for x in runs if x.data.tags.get("bnlab.role") == "job"]
    assert jobs and all(x.data.tags.get(V.VERDICTS_TAG) == V.SEQUENTIAL for x in jobs)
    ss.record({"wall_s": 13.0, "new_rounds": 0, "last": "interrupted"}, "round 1")  # the store is free
    assert real(store_uri(home)).get_experiment_by_name("smoke").tags[D.TAG_LAST] == "interrupted"

"""bnlab-decide: a study's grid in rounds of new seeds, through bnlab-train's exactly-once sweeps, until
every claim is decided by its anytime-valid verdict (bnlab.analysis.verdicts) or the budget is spent.

    bnlab-decide study=NAME max_seeds=N [seeds_per_round=K] [max_minutes=M] [bnlab-train overrides...]

Round r trains seeds r*K ... r*K+K-1 (`bnlab-train study=NAME seed=...`, a real multirun: Hydra's
launchers and the study's own overrides apply). After every round it reads the store, evaluates the
study's claims with the confidence sequence and prints one line. It stops when every claim is decided,
when max_seeds seeds are in, or when the next round would end after max_minutes (counted over every
invocation on this store, at the last round's pace). Ctrl-C stops it; the same command resumes: grid
points already FINISHED are never retrained, finished rounds are not relaunched.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from bnlab.analysis import verdicts as V

USAGE = ("usage: bnlab-decide study=NAME max_seeds=N [seeds_per_round=K] [max_minutes=M] "
         "[bnlab-train overrides...]")
OWN_KEYS = ("study", "max_seeds", "seeds_per_round", "max_minutes")
TAG_WALL, TAG_ROUNDS, TAG_LAST = "bnlab.decide.wall_s", "bnlab.decide.rounds", "bnlab.decide.last"
TAG_ROUND = "bnlab.decide.round"  # on each run: the round that trained it (or 'before' for earlier runs)
STOP_DECIDED, STOP_SEEDS, STOP_TIME, STOP_FAILED = "decided", "seeds", "time", "failed"


class UsageError(ValueError):
    """Bad input: one line naming the argument and what is allowed."""


@dataclass
class Plan:
    study: str
    max_seeds: int
    seeds_per_round: int = 2
    max_minutes: Optional[float] = None
    overrides: List[str] = field(default_factory=list)  # passed to every round's bnlab-train

    def rounds(self) -> List[List[int]]:
        k = self.seeds_per_round
        return [list(range(a, min(a + k, self.max_seeds))) for a in range(0, self.max_seeds, k)]


def parse_args(argv: Sequence[str]) -> Plan:
    own: Dict[str, str] = {}
    rest: List[str] = []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        elif key.lstrip("+~") == "seed":
            raise UsageError("seed: bnlab-decide chooses the seeds (0, 1, ... in rounds); set max_seeds and "
                             "seeds_per_round instead")
        elif a in ("-m", "--multirun"):
            continue  # every round is a multirun anyway
        else:
            rest.append(a)
    if not own.get("study"):
        raise UsageError("study must be given (study=NAME)")

    def integer(key: str, default: Optional[int], least: int) -> int:
        raw = own.get(key)
        if raw is None:
            if default is None:
                raise UsageError(f"{key} must be given (an integer >= {least})")
            return default
        try:
            v = int(raw)
        except ValueError:
            raise UsageError(f"{key} must be an integer >= {least}, got {raw!r}") from None
        if v < least:
            raise UsageError(f"{key} must be an integer >= {least}, got {raw!r}")
        return v

    max_seeds = integer("max_seeds", None, 2)
    per_round = integer("seeds_per_round", 2, 1)
    minutes = None
    if own.get("max_minutes") not in (None, "", "null"):
        try:
            minutes = float(own["max_minutes"])
        except ValueError:
            minutes = float("nan")
        if not (minutes > 0 and math.isfinite(minutes)):
            raise UsageError(f"max_minutes must be a number > 0 (or null), got {own['max_minutes']!r}")
    return Plan(own["study"], max_seeds, per_round, minutes, rest)


# ------------------------------------------------------------------------------ claims

def study_claims(study: str, runs, curves) -> list:
    """The study's claims (bnlab.analysis.study.evaluate_claims), every verdict read with the
    confidence sequence."""
    from bnlab.analysis.study import evaluate_claims

    with V.using(V.SEQUENTIAL):
        return list(evaluate_claims(study, runs, curves))


def tally(claims: list) -> Counter:
    return Counter(getattr(c, "decision", None).verdict if getattr(c, "decision", None) is not None
                   else V.UNDECIDED for c in claims)


def all_decided(claims: list) -> bool:
    return bool(claims) and tally(claims)[V.UNDECIDED] == 0


def _seeds_text(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if not s:
        return "none"
    if s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def round_line(label: str, claims: list, seeds_in: int, round_s: Optional[float], total_s: float) -> str:
    t = tally(claims)
    n = len(claims)
    decided = n - t[V.UNDECIDED]
    words = ", ".join(f"{t[w]} {w}" for w in (V.HOLDS, V.REFUTED) if t[w])
    need = [c.decision.seeds_needed for c in claims
            if c.decision.verdict == V.UNDECIDED and c.decision.seeds_needed is not None]
    und = f"{t[V.UNDECIDED]} undecided" + (f" (about {max(need)} seeds for the last)" if need else "")
    claims_text = f"{decided} of {n} claims decided" + (f" ({words})" if words else "") + f", {und}" if n \
        else "no claims to evaluate yet"
    took = f"round {round_s:.0f} s, " if round_s is not None else ""
    return f"{label}: {seeds_in} seeds so far; {claims_text}; {took}total {total_s:.0f} s"


# ------------------------------------------------------------------------------ the rounds

@dataclass
class Outcome:
    stopped: str  # STOP_DECIDED, STOP_SEEDS, STOP_TIME or STOP_FAILED
    rounds_trained: int
    seeds: List[int]  # complete seeds at the end
    claims: list
    wall_s: float  # total over every invocation, as recorded
    lines: List[str]
    status: int = 0  # the failed round's exit status (2: its bnlab-train refused the input)


def run_rounds(plan: Plan, *, launch: Callable[[List[int]], int], observe: Callable[[], Tuple[object, object]],
               complete: Callable[[object, List[int]], Set[int]], evaluate: Callable[[object, object], list],
               record: Callable[[dict], None] = lambda info: None, prior_wall_s: float = 0.0,
               step: Callable[[str, int], None] = lambda name, r: None, clock: Callable[[], float] = time.monotonic,
               out: Callable[[str], None] = print) -> Outcome:
    """The loop, with every side channel passed in: launch(seeds) -> exit status of a sweep of those
    seeds; observe() -> (runs, curves) of the study; complete(runs, seeds) -> the seeds whose every grid
    point has a FINISHED run; evaluate(runs, curves) -> claims with .decision; record(info) keeps the
    progress in the store (also on Ctrl-C). step(name, round) is called at the named steps
    'round_start', 'round_trained' and 'round_evaluated' (where a test injects an interruption)."""
    name = f"[decide {plan.study}]"
    start = clock()
    lines: List[str] = []
    trained = {"rounds": 0}
    all_seeds = list(range(plan.max_seeds))

    def say(line: str) -> None:
        lines.append(line)
        out(f"{name} {line}")

    def total() -> float:
        return prior_wall_s + (clock() - start)

    def keep(line: str) -> None:
        record({"wall_s": total(), "rounds": trained["rounds"], "last": line})

    def evaluate_store(label: str, round_s: Optional[float], runs=None, curves=None):
        if runs is None:
            runs, curves = observe()
        done = sorted(complete(runs, all_seeds))
        try:
            claims = evaluate(runs, curves) if done else []
        except Exception as e:  # noqa: BLE001 - reported, never hidden; the rounds go on
            say(f"{label}: the claims could not be computed: {type(e).__name__}: {e}")
            claims = []
        say(round_line(label, claims, len(done), round_s, total()))
        keep(lines[-1])
        return done, claims

    try:
        runs, curves = observe()
        done, claims = sorted(complete(runs, all_seeds)), []
        if done:  # what an earlier sweep or invocation left: perhaps decided already
            done, claims = evaluate_store("in the store before the first round", None, runs, curves)
        stopped, last_round_s, rc = None, None, 0
        while stopped is None:
            pending = [(r, [s for s in seeds if s not in done]) for r, seeds in enumerate(plan.rounds())]
            pending = [(r, seeds) for r, seeds in pending if seeds]
            budget = plan.max_minutes * 60.0 if plan.max_minutes is not None else math.inf
            if all_decided(claims):
                stopped = STOP_DECIDED
            elif not pending:
                stopped = STOP_SEEDS
            elif total() >= budget or (last_round_s is not None and total() + last_round_s > budget):
                stopped = STOP_TIME
            else:
                r, seeds = pending[0]
                label = f"round {r + 1} (seeds {_seeds_text(seeds)})"
                step("round_start", r)
                t0 = clock()
                try:
                    rc = launch(seeds)
                finally:  # an interrupted round counts: it may have trained some of its grid
                    trained["rounds"] += 1
                last_round_s = clock() - t0
                step("round_trained", r)
                if rc != 0:
                    say(f"{label}: the sweep exited with status {rc}; fix the cause and rerun the same command "
                        "to resume")
                    stopped = STOP_FAILED
                    break
                done, claims = evaluate_store(label, last_round_s)
                step("round_evaluated", r)
    except KeyboardInterrupt:
        say(f"interrupted after {total():.0f} s in all; the same command resumes")
        keep(lines[-1])
        raise
    why = {STOP_DECIDED: "every claim is decided",
           STOP_SEEDS: f"the seed budget is spent (max_seeds={plan.max_seeds})",
           STOP_TIME: f"the time budget is spent (max_minutes={plan.max_minutes}; the next round would end after it)",
           STOP_FAILED: "a round failed"}[stopped]
    final = total()
    say(f"stopped: {why}; {trained['rounds']} round(s) trained here, {len(done)} seeds, {final:.0f} s in all")
    for c in claims:
        out(f"  - {c.claim}: {c.decision.text()}")
    record({"wall_s": final, "rounds": trained["rounds"], "last": lines[-1]})
    return Outcome(stopped, trained["rounds"], done, claims, final, lines, rc)


# ------------------------------------------------------------------------------ the real store and sweeps

class StudyStore:
    """The study's grid (config hashes per seed, from the same composition bnlab-train validates) and
    its runs in the store."""

    def __init__(self, plan: Plan):
        from bnlab import cli
        from bnlab.config import ConfigError
        from bnlab.roles import config_hash

        cli._prepare_env()
        cli.check_study([f"study={plan.study}"])
        self.plan = plan
        self._hash = config_hash
        self._cli = cli
        self._grid: Dict[int, Set[str]] = {}
        try:
            first = self.configs(0)
        except ConfigError:
            raise
        except Exception as e:  # Hydra/OmegaConf composition errors: one line, as bnlab-train prints
            raise ConfigError(cli._error_line(e)) from e
        self.uri = first[0].tracking.uri
        self.experiment = first[0].tracking.experiment

    def configs(self, seed: int):
        jobs, _ = self._cli.expand_jobs([f"study={self.plan.study}", f"seed={seed}", *self.plan.overrides])
        return self._cli.validate_jobs(jobs)

    def grid(self, seed: int) -> Set[str]:
        if seed not in self._grid:
            self._grid[seed] = {self._hash(c) for c in self.configs(seed)}
        return self._grid[seed]

    def observe(self):
        from bnlab.analysis.runs import StoreNotFound, load_curves, load_runs

        try:
            runs = load_runs(self.experiment, self.uri)
        except StoreNotFound:
            import pandas as pd

            return pd.DataFrame(), pd.DataFrame()
        return runs, (load_curves(self.experiment, self.uri, runs=runs) if not runs.empty else runs.iloc[:0])

    def complete(self, runs, seeds: List[int]) -> Set[int]:
        if runs is None or runs.empty or "config_hash" not in runs:
            return set()
        fin = set(runs.loc[runs["status"].eq("FINISHED"), "config_hash"].dropna())
        return {s for s in seeds if self.grid(s) <= fin}

    def ours(self, runs, seeds) -> List[str]:
        """Run ids of the study's FINISHED runs in this grid (any seed up to max_seeds)."""
        if runs is None or runs.empty or "config_hash" not in runs:
            return []
        hashes = set().union(*(self.grid(s) for s in seeds)) if seeds else set()
        sel = runs["status"].eq("FINISHED") & runs["config_hash"].isin(hashes)
        return list(runs.loc[sel, "run_id"])

    def _experiment(self):
        """(client, experiment or None); None, None where a SQLite store does not exist yet (reading
        must not create it: a fresh store is created once, under the lock, by the first sweep)."""
        from bnlab.store import client, sqlite_path

        path = sqlite_path(self.uri)
        if path is not None and not path.is_file():
            return None, None
        c = client(self.uri)
        return c, c.get_experiment_by_name(self.experiment)

    def prior_wall_s(self) -> float:
        c, exp = self._experiment()
        if exp is None:
            return 0.0
        try:
            return float(exp.tags.get(TAG_WALL, 0.0))
        except ValueError:
            return 0.0

    def record(self, info: dict, round_label: str) -> None:
        """Experiment tags (total wall time, rounds, the last line) and, on every FINISHED run of the
        grid not yet tagged, bnlab.verdicts=sequential: the report then reads this study sequentially.
        A Ctrl-C while these writes are under way takes effect once they are done (sigint_deferred)."""
        with sigint_deferred():
            self._record(info, round_label)

    def _record(self, info: dict, round_label: str) -> None:
        from bnlab.analysis.runs import load_runs

        c, exp = self._experiment()
        if exp is None:
            return
        c.set_experiment_tag(exp.experiment_id, TAG_WALL, f"{info['wall_s']:.1f}")
        prev = exp.tags.get(TAG_ROUNDS)
        c.set_experiment_tag(exp.experiment_id, TAG_ROUNDS, str(int(prev or 0) + info.get("new_rounds", 0)))
        c.set_experiment_tag(exp.experiment_id, TAG_LAST, info["last"][:4000])
        runs = load_runs(self.experiment, self.uri)
        col = f"tags.{V.VERDICTS_TAG}"
        tagged = set(runs.loc[runs[col].eq(V.SEQUENTIAL), "run_id"]) if col in runs else set()
        for run_id in self.ours(runs, list(range(self.plan.max_seeds))):
            if run_id not in tagged:
                c.set_tag(run_id, V.VERDICTS_TAG, V.SEQUENTIAL)
                c.set_tag(run_id, TAG_ROUND, round_label)


def summary(experiment: str, uri: Optional[str] = None) -> Optional[str]:
    """For a report section: 'bnlab-decide: 7 rounds, 2412 s in all; last: stopped: ...' from the
    experiment's bnlab.decide.* tags, or None where bnlab-decide never ran on it (or no store exists)."""
    from bnlab.store import client, resolve_uri, sqlite_path

    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return None
    exp = client(resolve_uri(uri)).get_experiment_by_name(experiment)
    if exp is None or TAG_WALL not in exp.tags:
        return None
    t = exp.tags
    return (f"bnlab-decide: {t.get(TAG_ROUNDS, '0')} rounds, {float(t[TAG_WALL]):.0f} s in all; "
            f"last: {t.get(TAG_LAST, '')}")


def sweep_command(plan: Plan, seeds: List[int]) -> List[str]:
    """One round: bnlab-train's own console entry in this interpreter (the installed package, wherever
    its scripts are)."""
    return [sys.executable, "-c", "import sys; from bnlab.cli import train_main; sys.exit(train_main())",
            f"study={plan.study}", "seed=" + ",".join(map(str, seeds)), *plan.overrides]


@contextlib.contextmanager
def sigint_deferred():
    """A Ctrl-C (SIGINT) that arrives inside the block raises KeyboardInterrupt when the block ends,
    not in the middle of it: bnlab-decide's own store writes are never cut in half. (Seen once: a
    Ctrl-C that landed while a round was being recorded, and the interrupted command's last write
    then found the SQLite store locked and waited out the whole busy timeout.) Only in the main
    thread, where Python runs signal handlers; elsewhere the block runs as it is. If the block raises
    after a Ctrl-C came, KeyboardInterrupt is raised with that error as its context."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    except BaseException as e:
        if caught and not isinstance(e, KeyboardInterrupt):
            # The block failed after a Ctrl-C came: the Ctrl-C still stops the command (a caller
            # that goes on after such an error would drop it), with the block's error as its context.
            _deliver_sigint(before)
        raise
    finally:
        signal.signal(signal.SIGINT, before)
    if caught:
        _deliver_sigint(before)


def _deliver_sigint(handler) -> None:
    """What SIGINT's handler of before sigint_deferred() would have done."""
    if callable(handler):
        handler(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        raise KeyboardInterrupt


INTERRUPTED = (130, -signal.SIGINT)  # a sweep ended by Ctrl-C: bnlab-train's exit status, or killed by SIGINT
SIGINT_GRACE_S = 15.0  # how long a Ctrl-C'd sweep may take to end its runs before it is signalled itself


def launch_sweep(plan: Plan, seeds: List[int]) -> int:
    """Runs one round's multirun and returns its exit status; a sweep that was interrupted
    (INTERRUPTED) raises KeyboardInterrupt here. A terminal's Ctrl-C reaches the sweep too (same
    process group): it is waited for, so that it ends its runs KILLED and releases its claims; only a
    sweep still running after SIGINT_GRACE_S (this process alone was signalled) gets a SIGINT of its own."""
    proc = subprocess.Popen(sweep_command(plan, seeds), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait()
        if rc in INTERRUPTED:
            # The sweep was interrupted (Ctrl-C reaches the whole process group): so is this command,
            # even where its own KeyboardInterrupt was lost (Python drops one raised in a finalizer).
            raise KeyboardInterrupt
        return rc
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=SIGINT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _sequentially(evaluate: Callable, study: str, runs, curves) -> list:
    """Whatever evaluates the claims, bnlab-decide reads every verdict with the confidence sequence."""
    with V.using(V.SEQUENTIAL):
        return list(evaluate(study, runs, curves))


def decide(plan: Plan, *, evaluate: Optional[Callable] = None, launch: Optional[Callable] = None,
           step: Callable[[str, int], None] = lambda name, r: None, out: Callable[[str], None] = print) -> Outcome:
    """bnlab-decide on the real store: `evaluate(study, runs, curves)` defaults to study_claims and
    `launch(plan, seeds)` to launch_sweep; both may be replaced (tests inject an evaluator)."""
    store = StudyStore(plan)
    evaluate = evaluate or study_claims
    launch = launch or launch_sweep
    state = {"rounds": 0, "label": "before"}

    def record(info: dict) -> None:
        info = {**info, "new_rounds": info["rounds"] - state["rounds"]}
        state["rounds"] = info["rounds"]
        store.record(info, state["label"])

    def launch_round(seeds: List[int]) -> int:
        state["label"] = _seeds_text(seeds)
        return launch(plan, seeds)

    return run_rounds(plan, launch=launch_round, observe=store.observe, complete=store.complete,
                      evaluate=lambda runs, curves: _sequentially(evaluate, plan.study, runs, curves), record=record,
                      prior_wall_s=store.prior_wall_s(), step=step, out=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        try:
            print(__doc__.strip(), flush=True)
        except BrokenPipeError:  # `bnlab-decide --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from bnlab.config import ConfigError
    from bnlab.data import DataError

    try:
        plan = parse_args(argv)
        outcome = decide(plan)
    except (UsageError, ConfigError, DataError) as e:
        print(f"bnlab-decide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnlab-decide: interrupted; rerun the same command to resume (finished grid points are kept)",
              file=sys.stderr)
        return 130
    return (2 if outcome.status == 2 else 1) if outcome.stopped == STOP_FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

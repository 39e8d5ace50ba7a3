"""Every study's analysis on a small real store made from the study's OWN YAML at smoke size (the
session fixture `study_store`, tests/study_stores.py: its grid as `bnlab-train study=NAME` expands
it, 2 seeds, synthetic data): figures, captions, claims with verdicts, the report section. Then the
claim rules on hand-built frames, where they must hold and where they must not; a user's study with
its own analysis module and YAML claims; the default section; a relaunch that changes only
execution fields."""
from __future__ import annotations

import shutil
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bnlab.analysis import report, runs as R
from bnlab.analysis import study as ST
from bnlab.analysis import verdicts as V
from bnlab.analysis.study import Prepared
from bnlab.analysis.studies import batch_size, ema_vs_precise, momentum, placement, update_ops
from bnlab.analysis.studies import lr as lr_study

from conftest import runs_of
from study_stores import smoke_jobs, study_names

STUDIES = study_names()


def frames(uri, study):
    runs = R.load_runs(study, uri)
    return runs, R.load_curves(study, uri, runs=runs)


# ------------------------------------------------------------------------------ every study, its own YAML

# What every run of these studies logs beside the usual metrics (their YAML's own settings).
LOGGED = {
    "ema_vs_precise": {"step/val/acc", "step/val/acc_precise_bn", "step/val/acc_shadow/0.01", "step/lr"},
    "precise_samples": {"val/acc_precise_bn/16", "val/acc_precise_bn/60000"},
    "norm_batch": {"val/acc_batch_stats", "val/acc_precise_bn", "train/acc"},
    "gamma_beta": {"val/acc", "train/acc"},
}


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_analysis_runs_on_its_own_smoke_store(study_store, study, tmp_path):
    uri, _, counts = study_store
    runs, curves = frames(uri, study)
    # counts: the jobs the study's YAML expands to at smoke size, each trained once into the store
    assert len(runs) == counts[study] and runs["status"].eq("FINISHED").all()
    logged = curves.groupby("run_id")["metric"].agg(set)  # the metrics each run logged points of
    for run_id in runs["run_id"]:
        missing = LOGGED.get(study, set()) - logged.get(run_id, set())
        assert not missing, (run_id, missing)
    analysis = ST.get_study(study)
    assert analysis.module == f"bnlab.analysis.studies.{study}", "every built-in study has its own module"
    data = analysis.prepare(runs, curves)
    assert analysis.figures
    for spec in analysis.figures:
        if not spec.needs(data):
            continue
        fig = spec.make(data)
        assert fig.get_suptitle() and any(ax.has_data() for ax in fig.axes), spec.name
        caption = spec.caption(data)
        assert caption and not caption.startswith("No ") and "n=2" in caption, (spec.name, caption)
    rows = analysis.claim_rows(data)
    if rows is not None:
        assert rows, f"{study}: its claims found no data in its own runs"
        for c in rows:
            assert isinstance(c.decision, V.Decision) and c.decision.verdict in V.VERDICTS
            assert c.claim and c.measured
        assert all(c.decision.text().startswith(f"{c.decision.verdict} (rule: ") for c in rows)
    # evaluate_claims (bnlab-decide's entry point) gives the same rows
    assert [c.measured for c in ST.evaluate_claims(study, runs, curves)] == [c.measured for c in rows or []]
    section = report.report_study(study, uri, tmp_path, log=lambda *a: None)
    md = section.read_text()
    assert md.startswith(f"## {study}") and f"- Runs: {len(runs)} runs, " in md
    assert "Collapsed (a group and seed counted once): none" in md
    if rows:
        assert "| claim (source) | bnlab measured | verdict | interval |" in md
        assert any(f"| {w} (rule: " in md for w in V.VERDICTS)
    summary = pd.read_csv(tmp_path / study / "summary.csv")
    # two seeds per group (diverged runs are run but not averaged), none collapsed
    assert (summary["n_collapsed"] == 0).all() and (summary["n_runs"] == 2).all() and (summary["n_seeds"] <= 2).all()


def test_report_orders_sections_by_the_studies_order(study_store, tmp_path):
    uri, _, _ = study_store
    assert report.main([f"tracking.uri={uri}", f"out={tmp_path}", "study=smoke,lr,momentum"]) == 0
    md = (tmp_path / "REPORT.md").read_text()
    assert md.index("## smoke") < md.index("## momentum") < md.index("## lr")
    builtin = ST.builtin_studies()
    assert builtin[0] == "smoke" and set(builtin) == set(STUDIES)
    for word, meaning in V.MEANINGS.items():
        assert f"*{word}*: {meaning}" in md


def test_step_level_metrics_follow_the_study_yaml(study_store):
    uri, _, _ = study_store
    runs, curves = frames(uri, "ema_vs_precise")
    cfg = smoke_jobs("ema_vs_precise")[0][1]
    steps_per_epoch = cfg.data.synthetic_train // cfg.data.batch_size
    every = cfg.train.eval_every
    step = sorted(curves.loc[curves["metric"] == "step/val/acc", "step"].unique())
    assert step == list(range(every, cfg.train.epochs * steps_per_epoch + 1, every))
    d = ema_vs_precise.prepare(runs, curves)
    # the learning rate changes at each milestone: first logged at the next evaluation after it
    want = [float(-(-(m * steps_per_epoch + 1) // every) * every) for m in cfg.optim.milestones]
    assert d.changes == want
    assert set(d.gaps["momentum"].round(6)) == {round(m, 6) for m in [cfg.bn.momentum, *cfg.bn.shadow_momenta]}


def test_a_relaunch_that_only_changes_execution_fields_trains_nothing(study_store, tmp_path, run_cli):
    _, home, _ = study_store
    copy = tmp_path / "home"
    shutil.copytree(home / "runs", copy / "runs")
    smoke = [o for o in smoke_jobs("smoke")[0][0] if not o.startswith(("bn.update_stats", "seed"))]
    r = run_cli("bnlab-train", *smoke, "seed=0,1", "data.eval_batch_size=512", "train.device=cpu", "train.threads=2",
                home=copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 finished, 0 failed, 4 skipped" in r.stdout + r.stderr
    _, kids = runs_of(copy, "smoke")
    assert sum(k.data.tags.get("bnlab.role") == "job" for k in kids) == 4  # the 4 runs of the store, no new one


# ------------------------------------------------------------------------------ claim rules, hand-built frames

def _frame(rows):
    base = {"status": "FINISHED", "diverged": False}
    return pd.DataFrame([{**base, **r} for r in rows])


def _claims(module, rows):
    frame = _frame(rows)
    study = module.STUDY
    return study.claims(study.prepare(frame, pd.DataFrame()))


def _words(claims):
    return [c.decision.verdict for c in claims]


def test_update_ops_placement_and_momentum_claims_follow_their_rules():
    rows = [{"seed": s, "bn.update_stats": u, "final/train/acc": 0.85, "final/val/acc": 0.84 if u else 0.12,
             "final/val/acc_precise_bn": 0.845, "final/val/acc_batch_stats_bs1": 0.1} for s in range(3) for u in (True, False)]
    assert _words(_claims(update_ops, rows)) == ["holds"] * 3
    rows[1]["final/val/acc"] = 0.7  # one seed without update ops still validates well: the mean 0.31 > 0.3
    assert _claims(update_ops, rows)[0].decision.verdict == "refuted"
    rows = [{"seed": s, "model.activation": "relu", "bn.placement": p, "final/val/acc": v + 0.01 * s}
            for s in range(3) for p, v in (("before_act", 0.85), ("after_act", 0.85), ("none", 0.6))]
    before_none, before_after = _claims(placement, rows)
    assert before_none.decision.verdict == "holds" and "+0.250" in before_none.measured
    assert before_after.decision.verdict == "undecided"  # paired difference exactly 0: CI [0, 0] is not above 0
    assert before_none.decision.method == V.T_METHOD
    rows = [{"seed": s, "bn.momentum": 0.1, "data.batch_size": 256, "train.epochs": 1, "data.train_subset": None,
             "final/train/acc": 0.8, "final/val/acc": 0.78, "final/gap/acc": 0.02,
             "final/val/acc_shadow/0.001": 0.2 + 0.01 * s, "final/val/acc_shadow/1": 0.7 + 0.01 * s} for s in range(3)]
    got = _claims(momentum, rows)
    assert _words(got) == ["holds", "holds"]
    assert "234 steps" in got[0].measured and "0.23" in got[0].measured
    # momentum 1 better than 0.1 on every seed: refuted, not merely "no"
    for r in rows:
        r["final/val/acc_shadow/1"] = 0.9 + 0.01 * r["seed"]
    assert _claims(momentum, rows)[1].decision.verdict == "refuted"


def test_batch_size_claims_follow_their_rules():
    rows = [{"seed": s, "data.batch_size": b, "bn.placement": p, "final/val/acc": (0.8 if p != "none" else 0.2) + 0.01 * s,
             "final/val/acc_precise_bn": 0.81 + 0.01 * s if p != "none" else None,
             "final/val/acc_batch_stats_bs1": 0.1 if p != "none" else None}
            for s in range(3) for b in (4, 512) for p in ("before_act", "none")]
    assert _words(_claims(batch_size, rows)) == ["holds"] * 3
    rows[0]["final/val/acc_precise_bn"] = 0.70  # one seed at batch 4: precise 0.1 below running -> mean -0.033
    assert _claims(batch_size, rows)[1].decision.verdict == "refuted"


def test_lr_claim_compares_the_regions_of_convergence():
    def rows(none_learns_at_1):
        return [{"seed": s, "optim.lr": lr, "bn.placement": p,
                 "final/train/acc": 0.1 if (p == "none" and lr == 1.0 and not none_learns_at_1) else 0.8}
                for s in range(2) for lr in (0.1, 1.0) for p in ("before_act", "none")]
    got = _claims(lr_study, rows(False))[0]
    assert got.decision.verdict == "holds" and "without [0.1, 0.1]" in got.measured
    assert _claims(lr_study, rows(True))[0].decision.verdict == "refuted"  # same region: not wider


# ------------------------------------------------------------------------------ YAML claims, each rule kind

def _ok(values_a, values_b=None):
    rows = [{"seed": s, "bn.placement": "before_act", "final/val/acc": v} for s, v in enumerate(values_a)]
    rows += [{"seed": s, "bn.placement": "none", "final/val/acc": v} for s, v in enumerate(values_b or [])]
    return Prepared(_frame(rows), pd.DataFrame())


def _yaml(**spec):
    from bnlab.analysis.rules import yaml_claims

    return yaml_claims([{"claim": "c", "metric": "val/acc", **spec}], "mine")


PAIRED = dict(rule="paired_above", a={"bn.placement": "before_act"}, b={"bn.placement": "none"})


@pytest.mark.parametrize("spec, a, b, verdict", [
    (PAIRED, [0.85, 0.86, 0.87], [0.60, 0.62, 0.61], "holds"),
    (PAIRED, [0.60, 0.62, 0.61], [0.85, 0.86, 0.87], "refuted"),
    (PAIRED, [0.85, 0.70, 0.90], [0.80, 0.80, 0.80], "undecided"),
    ({**PAIRED, "threshold": 0.3}, [0.85, 0.86, 0.87], [0.60, 0.62, 0.61], "refuted"),  # gain 0.25 < 0.3
    (dict(rule="within", where={"bn.placement": "before_act"}, reference=0.86, tolerance=0.05),
     [0.85, 0.86, 0.87], None, "holds"),
    (dict(rule="within", where={"bn.placement": "before_act"}, reference=0.5, tolerance=0.05),
     [0.85, 0.86, 0.87], None, "refuted"),
    (dict(rule="within", reference=0.86, tolerance=0.01), [0.80, 0.86, 0.92], None, "undecided"),
    (dict(rule="above", bound=0.5), [0.85, 0.86, 0.87], None, "holds"),
    (dict(rule="above", bound=0.9), [0.85, 0.86, 0.87], None, "refuted"),
    (dict(rule="below", bound=0.9), [0.85, 0.86, 0.87], None, "holds"),
    (dict(rule="below", bound=0.5), [0.85, 0.86, 0.87], None, "refuted"),
    (dict(rule="above", where={"bn.placement": "after_act"}, bound=0.5), [0.85, 0.86, 0.87], None, "undecided"),
])
def test_yaml_claim_rules(spec, a, b, verdict):
    (claim,) = _yaml(**spec)(_ok(a, b))
    assert claim.decision.verdict == verdict, claim.decision.text()
    assert claim.decision.text().startswith(f"{verdict} (rule: ")
    if verdict != "undecided" or spec.get("where", {}).get("bn.placement") != "after_act":
        assert "(n=3)" in claim.measured


def test_bad_yaml_claims_name_the_field():
    with pytest.raises(ValueError, match=r"claims\[0\]\.rule must be one of paired_above, within, above, below"):
        _yaml(rule="bigger")
    with pytest.raises(ValueError, match=r"claims\[0\]\.bound is required by rule above"):
        _yaml(rule="above")


# ------------------------------------------------------------------------------ a user's own study

MODULE = '''
"""A researcher's own analysis of study `mine`."""
from bnlab.analysis import plot as P, stats as S
from bnlab.analysis.study import Claim, FigureSpec, Prepared, Study, register
from bnlab.analysis import verdicts as V


def prepare(runs, curves):
    d = Prepared(runs, curves)
    d.calls = getattr(prepare, "calls", 0) + 1
    prepare.calls = d.calls
    return d


def figure(d):
    fig, axes = P.new_figure()
    axes[0, 0].plot(d.ok["seed"], d.ok["final/val/acc"], "o")
    return P.finish(fig, "My own figure of study mine")


def claims(d):
    v = d.ok["final/train/acc"]
    return [Claim("train/acc is a fraction (my note)", S.acc_text(v, "final/train/acc"),
                  V.from_bool(bool(((v >= 0) & (v <= 1)).all()), "every seed in [0, 1]", n=len(v)))]


STUDY = register(Study("mine", prepare, figures=[FigureSpec("mine", figure, lambda d: f"prepared {d.calls} time(s)")],
                       claims=claims))
'''

YAML = '''# @package _global_
# Question: does my own study get its own section?
analysis: mystudy
claims:
  - claim: BN before the activation beats no BN (my source)
    rule: paired_above
    metric: val/acc
    a: {bn.placement: before_act}
    b: {bn.placement: none}
tracking:
  experiment: mine
  study: mine
'''


def _train_mine(home):
    """The user's runs: 2 placements x 2 seeds, tiny synthetic data, in the project's own store."""
    from bnlab.config import BNConfig, Config, DataConfig, DataName, Placement, TrainConfig
    from bnlab.roles import config_hash
    from bnlab.store import ensure_experiment
    from bnlab.tracking import MlflowTracker
    from bnlab.train import train

    uri = f"sqlite:///{home / 'runs' / 'mlflow.db'}"
    (home / "runs").mkdir(parents=True)
    ensure_experiment(uri, "mine")
    for where in (Placement.before_act, Placement.none):
        for seed in (0, 1):
            cfg = Config(seed=seed, data=DataConfig(name=DataName.synthetic, synthetic_train=256, synthetic_val=64,
                                                    batch_size=32),
                         bn=BNConfig(placement=where, precise_samples=64),
                         train=TrainConfig(epochs=1, threads=1, bs1_samples=0, progress=False))
            cfg.tracking.experiment = cfg.tracking.study = "mine"
            train(cfg, MlflowTracker(uri, "mine", f"{where.value} s={seed}"),
                  extra_tags={"bnlab.study": "mine", "bnlab.config_hash": config_hash(cfg)})
    return uri


def test_a_users_study_gets_its_figure_and_claim_table(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "conf" / "study").mkdir(parents=True)
    (project / "conf" / "study" / "mine.yaml").write_text(YAML)
    (project / "mystudy.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.setenv("BNLAB_HOME", str(project))
    monkeypatch.chdir(project)
    monkeypatch.delitem(sys.modules, "mystudy", raising=False)
    uri = _train_mine(project)
    assert "mine" in ST.known_studies()
    assert report.main([f"tracking.uri={uri}", f"out={tmp_path / 'out'}", "study=mine"]) == 0
    md = (tmp_path / "out" / "mine" / "section.md").read_text()
    assert "**Question.** does my own study get its own section?" in md
    assert "### My own figure of study mine" in md and (tmp_path / "out" / "mine" / "mine.png").is_file()
    assert "*prepared 1 time(s)*" in md  # prepare ran once for the figure, its caption and the claims
    assert "| train/acc is a fraction (my note) |" in md and "| holds (rule: every seed in [0, 1]; n=4) |" in md
    assert "| BN before the activation beats no BN (my source) |" in md
    assert "95% CI of the paired difference (bn.placement=before_act) − (bn.placement=none) of val/acc above 0" in md
    runs, curves = frames(uri, "mine")
    got = ST.evaluate_claims("mine", runs, curves)
    assert [c.claim for c in got] == ["train/acc is a fraction (my note)",
                                     "BN before the activation beats no BN (my source)"]
    assert got[1].decision.n == 2 and got[1].decision.verdict in V.VERDICTS


def test_a_study_without_analysis_gets_the_default_section(study_store, tmp_path):
    uri, _, _ = study_store
    runs, curves = frames(uri, "gamma_beta")
    plain = ST.default_study("gamma_beta_copy")
    d = plain.prepare(runs, curves)
    names = [s.name for s in plain.figures]
    assert names == ["final_by_key", "curves"]
    fig = plain.figures[0].make(d)
    assert sorted(ax.get_xlabel() for ax in fig.axes) == ["bn.affine", "model.activation"]
    caption = plain.figures[0].caption(d)
    assert "bn.affine=true: val/acc" in caption and "model.activation=relu" in caption and "(n=4)" in caption
    assert plain.claim_rows(d) is None


def test_seed_intervals_of_the_default_section_match_the_stats_kit(study_store):
    uri, _, _ = study_store
    runs, _ = frames(uri, "smoke")
    from bnlab.analysis import stats as S

    caption = ST.caption_final_by_key(Prepared(runs, pd.DataFrame()))
    off = runs[runs["bn.update_stats"] == False]["final/val/acc"]  # noqa: E712
    assert f"bn.update_stats=false: val/acc {S.acc_text(off)}" in caption
    assert np.isfinite(off).all()

"""What the MLflow UI shows: run names over every study's grid, the params that define a run,
descriptions, standard tags, the study view; no store needed."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bnlab import describe as D
from bnlab.config import (BNConfig, Config, DataConfig, DataName, ModelConfig, ModelName, Placement, flatten,
                          to_plain)
from bnlab.roles import ROLES, Role, field_role
from conftest import CONF_DIR, ROOT, STUDIES


@pytest.fixture(scope="module")
def expand():
    from bnlab.cli import _prepare_env, expand_jobs

    _prepare_env()
    return lambda args: expand_jobs(args)[0]


def _grids():
    """Every study's grid, and the explicit grids its header documents (e.g. momentum's 72 runs)."""
    for s in STUDIES:
        yield s, [f"study={s}"]
        for line in (CONF_DIR / "study" / f"{s}.yaml").read_text().splitlines():
            m = re.search(r"bnlab-train (study=\S+ \S+=\S*,\S*)", line)
            if m:
                yield s, m.group(1).split()


@pytest.mark.parametrize("study,args", list(_grids()), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_names_differ_within_the_first_20_characters(expand, study, args):
    jobs = expand(args)
    varying = D.varying_keys(jobs)
    assert varying, f"{study}: its grid varies nothing"
    names = [D.run_name(j, varying) for j in jobs]
    assert len({n[:D.NAME_WIDTH] for n in names}) == len(jobs), sorted(names)
    for job, name in zip(jobs, names):
        parts = name.split(" ")
        assert len(parts) == len(varying)  # one key=value per varying key, nothing else
        assert parts[-1].startswith("s=") and "study" not in name  # the seed last, the study left out
        values = dict(o.split("=", 1) for o in job)
        for k, part in zip([k for k in varying if k != "seed"] + ["seed"], parts):
            assert part == f"{D.short_key(k, varying)}={D.short_value(values[k])}"


def test_run_name_leaves_out_keys_that_do_not_vary_and_bookkeeping():
    job = ["study=smoke", "train.threads=1", "bn.update_stats=False", "train.epochs=3", "seed=1",
           "tracking.uri=http://127.0.0.1:5000", "hydra.launcher.n_jobs=2"]
    assert D.run_name(job, ["bn.update_stats", "seed"]) == "update=off s=1"
    # a single run names the defining keys the user overrode, in their order
    assert D.run_name(job) == "update=off ep=3 s=1"
    assert D.run_name(["train.progress=false", "tracking.experiment=x"]) == "default"
    assert D.run_name(["bn.placement=after_act", "model.activation=sigmoid", "optim.lr=1.0",
                       "bn.momentum=1e-3"]) == "bn=post act=sigm lr=1 mom=0.001"


def test_short_keys_stay_distinct():
    assert D.short_key("bn.momentum", ["bn.momentum", "optim.momentum"]) == "mom"
    assert D.short_key("optim.momentum", ["bn.momentum", "optim.momentum"]) == "sgd_mom"
    assert D.short_key("bn.eps", ["bn.eps"]) == "eps"  # not in the alias table: last component
    # two unknown keys with the same last component keep their full names
    assert D.short_key("a.width", ["a.width", "b.width"]) == "a.width"
    assert D.short_key("b.width", ["a.width", "b.width"]) == "b.width"


def test_params_are_the_config_minus_the_documented_bookkeeping():
    fm = flatten(to_plain(Config()))
    p = D.run_params(Config())
    assert set(p) == {k for k in fm if field_role(k).role in (Role.result, Role.seed, Role.extra)
                      and field_role(k).only_when is None}
    assert not any(k.startswith("tracking.") for k in p)
    assert "train.progress" not in p and "train.threads" not in p and "data.synthetic_train" not in p
    assert "train.device" not in p and "data.eval_batch_size" not in p and "bn.shadow_momenta" in p
    syn = D.run_params(Config(data=DataConfig(name=DataName.synthetic, synthetic_train=300)))
    assert syn["data.synthetic_train"] == 300 and "data.synthetic_val" in syn and "model.hidden" not in syn
    mlp = D.run_params(Config(model=ModelConfig(name=ModelName.mlp, hidden=[64])))
    assert mlp["model.hidden"] == [64]
    # the parent: what every run shares, without the keys the sweep varies
    fixed = D.fixed_params(fm, ["seed", "bn.update_stats"])
    assert "seed" not in fixed and "bn.update_stats" not in fixed and fixed["bn.momentum"] == 0.1
    assert set(fixed) == set(p) - {"seed", "bn.update_stats"}


def test_readme_documents_the_params_list_and_the_name_scheme():
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    for key in [k for k, r in ROLES.items() if r.role not in (Role.result, Role.seed) or r.only_when]:
        assert f"`{key}`" in readme, key
    for key, alias in D.KEY_ALIASES.items():
        assert f"`{alias}` {key}" in readme, key
    for value, alias in D.VALUE_ALIASES.items():
        assert f"`{value}` -> `{alias}`" in readme, value


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_has_a_description(study):
    h = D.study_header(study)
    assert h.get("Question") and h["Run"].startswith(f"bnlab-train study={study}")
    assert h["Report"] == f"bnlab-report study={study}"
    text = D.experiment_description(study, 6, ["bn.update_stats", "seed"])
    assert h["Question"] in text and re.search(rf"`bnlab-train study={study}( [^`]*)?` \(6 runs\)", text), text
    assert f"## {study}" in text and "results/REPORT.md" in text and f"experiments/{study}.md" in text
    assert "`update` = bn.update_stats" in text and (ROOT / "experiments" / f"{study}.md").is_file()


def test_study_view_state_lists_the_varying_params_and_the_answer():
    state = json.loads(D.experiment_tags("lr", 54, ["optim.lr", "bn.placement", "seed"])
                       [f"mlflow.sharedViewState.{D.VIEW_KEY}"])
    assert state["selectedColumns"][:6] == ["params.`optim.lr`", "params.`bn.placement`", "params.`seed`",
                                            "metrics.`val/acc`", "metrics.`val/acc_precise_bn`", "metrics.`gap/acc`"]
    # a sweep that is not a study (bnlab-train -m seed=0,1) gets the view but no study description
    assert set(D.experiment_tags(None, 2, ["seed"])) == {f"mlflow.sharedViewState.{D.VIEW_KEY}"}
    url = D.runs_url("http://127.0.0.1:5000/", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=bnlab"


def test_run_description_says_what_runs():
    d = D.run_description(Config(bn=BNConfig(update_stats=False), seed=2))
    assert d.startswith("LeNet (sigmoid), BN before the activation (momentum 0.1, running statistics never updated)")
    assert d.endswith("on Fashion-MNIST; seed 2") and "\n" not in d
    assert "no BN" in D.run_description(Config(bn=BNConfig(placement=Placement.none)))
    assert "cumulative average" in D.run_description(Config(bn=BNConfig(momentum=None)))


def test_parent_name_is_the_study_and_its_launch_time():
    assert re.fullmatch(r"smoke \d\d-\d\d \d\d:\d\d", D.parent_name("smoke"))


def test_standard_tags_carry_the_commit_of_the_running_code():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    t = D.run_tags(Config())
    assert t["mlflow.source.git.commit"] == head.stdout.strip()
    assert t["mlflow.source.name"] == "bnlab-train" and t["mlflow.user"] and t["mlflow.source.type"] == "LOCAL"
    assert t["mlflow.note.content"] == D.run_description(Config()) and t["bnlab.threads"] == "default"

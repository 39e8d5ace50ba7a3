"""Config layer: every study composes and validates, every sweep key is in the schema, and every
bad override fails before anything is written, naming the field."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bnlab import cli, studies
from bnlab.config import Config, ConfigError, flatten, to_plain
from bnlab.roles import config_hash

from conftest import CONF_DIR, ROOT, STUDIES
SCHEMA_KEYS = set(flatten(to_plain(Config())))
GROUPS = {"study", "model", "data"}  # config groups, not fields


@pytest.fixture(autouse=True)
def _env(home):
    cli._prepare_env()


def test_studies_exist():
    assert {"smoke", "momentum", "update_ops", "batch_size", "lr", "placement", "d2l"} <= set(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_composes_and_its_sweep_keys_exist(study):
    text = (CONF_DIR / "study" / f"{study}.yaml").read_text()
    assert text.startswith("# @package _global_"), "a study is a global diff"
    header = text.splitlines()[1:6]
    assert any("Question" in l for l in header) and any("bnlab-train study=" in l for l in header)
    assert any("bnlab-report study=" in l for l in text.splitlines()[:8])
    jobs, multirun = cli.expand_jobs([f"study={study}"])
    assert multirun and len(jobs) >= 2
    for job in jobs:
        for o in job:
            key = o.split("=", 1)[0]
            if key in GROUPS:
                continue
            assert key in SCHEMA_KEYS, f"{study}: sweep key {key} is not in the schema"
    cfgs = cli.validate_jobs(jobs)
    assert len(cfgs) == len(jobs) and all(isinstance(c, Config) for c in cfgs)
    assert all(c.tracking.experiment == study and c.tracking.study == study for c in cfgs)
    # the sweep's validation (one compose per set of group overrides) gives what a whole compose
    # of the job gives: its first, a middle and its last job (every swept key changes between them)
    for i in sorted({0, len(jobs) // 2, len(jobs) - 1}):
        assert cfgs[i] == cli.validate_job(jobs[i]), (study, jobs[i])
    hashes = {config_hash(c) for c in cfgs}
    assert len(hashes) == len(jobs), "every grid point must have its own config hash"


# Every kind of override Hydra distinguishes, in one sweep: config-group choices (several sets, so
# several composes), values, additions (+, ++), deletion (~), interpolations, lists, dicts, null.
MIXED = [
    ["model=resnet20", "data=cifar10", "optim.lr=0.05"],
    ["bn.momentum=0.01", "data.batch_size=32"],
    ["model=resnet20", "data=cifar10", "seed=3", "bn.momentum=null", "bn.placement=after_act"],
    ["model=custom", "model.target=mynets:Net", "+model.kwargs.width=4", "++model.kwargs.depth=2"],
    ["model=custom", "model.target=mynets:Net", "+model.kwargs={a: 1, b: [2, 3]}"],
    ["bn.decay=0.9", "seed=1"],
    ["study=lr", "optim.lr=0.3", "seed=4"],
    ["study=placement", "bn.placement=none", "model.activation=relu"],
    ["data.batch_size=${train.epochs}", "bn.shadow_momenta=[0.01,0.2]"],
    ["model={activation: relu}", "optim.momentum=0.5"],
    ["model=custom", "model.target=mynets:Net", "+model.kwargs.width=3", "~model.kwargs.width"],
    ["study=lr", "data=synthetic", "data.synthetic_train=64", "seed=4"],
    [],
]


def test_a_sweeps_validation_is_each_jobs_own_compose():
    cfgs = cli.validate_jobs(MIXED)
    whole = [cli.validate_job(job) for job in MIXED]
    assert cfgs == whole
    assert [config_hash(c) for c in cfgs] == [config_hash(c) for c in whole]
    # the values reached each job, not the first job of its group set
    assert (cfgs[0].optim.lr, cfgs[2].optim.lr, cfgs[2].seed, cfgs[2].bn.momentum) == (0.05, 0.1, 3, None)
    assert cfgs[3].model.kwargs == {"width": 4, "depth": 2} and cfgs[4].model.kwargs == {"a": 1, "b": [2, 3]}
    assert cfgs[8].data.batch_size == cfgs[8].train.epochs and cfgs[9].model.activation.value == "relu"
    assert cfgs[10].model.kwargs == {}


@pytest.mark.parametrize("bad", [
    ["bn.momentum=7"], ["bn.foo=1"], ["+bn.foo=1"], ["data.batch_size=abc"], ["model=nosuch"],
    ["bn.momentum=0.2", "bn.decay=0.9"], ["+bn.momentum=0.2"], ["~bn.nosuch"], ["seed=0,1"],
    ["model@x=resnet20"], ["nosuch@x=1"], ["~optim.milestones"], ["~model.kwargs.width"],
])
def test_a_bad_job_in_a_sweep_fails_as_it_fails_alone(bad):
    with pytest.raises(Exception) as alone:
        cli.validate_job(bad)
    with pytest.raises(Exception) as in_sweep:
        cli.validate_jobs([["seed=1"], ["model=resnet20", "data=cifar10", "seed=2"], bad, ["seed=3"]])
    assert type(in_sweep.value) is type(alone.value)
    assert cli._error_line(in_sweep.value) == cli._error_line(alone.value)


def test_a_sweeps_validation_sees_the_users_own_config_groups(tmp_path, monkeypatch):
    # A user's config folder with a study and a config group of its own ("sched", which a value
    # key of that name must not be mistaken for): its choices are group overrides, as in a compose.
    conf = tmp_path / "conf"
    (conf / "study").mkdir(parents=True)
    (conf / "sched").mkdir()
    (conf / "study" / "mine.yaml").write_text("# @package _global_\ntracking:\n  study: mine\noptim:\n  lr: 0.2\n")
    (conf / "sched" / "fast.yaml").write_text("# @package _global_\noptim:\n  lr: 0.4\n  momentum: 0.5\n")
    (conf / "sched" / "slow.yaml").write_text("# @package _global_\noptim:\n  lr: 0.01\n")
    monkeypatch.setenv(studies.ENV, str(conf))
    jobs = [["study=mine", "seed=0"], ["study=mine", "+sched=fast", "seed=1"], ["study=mine", "+sched=slow"],
            ["study=mine", "+sched=fast", "optim.momentum=0.7"], ["+sched=slow", "optim.lr=0.03"]]
    cfgs = cli.validate_jobs(jobs)
    assert cfgs == [cli.validate_job(job) for job in jobs]
    assert [c.optim.lr for c in cfgs] == [0.2, 0.4, 0.01, 0.4, 0.03]
    assert [c.optim.momentum for c in cfgs[3:4]] == [0.7] and cfgs[1].optim.momentum == 0.5


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_has_a_card_with_its_command_and_conclusion(study):
    card = ROOT / "experiments" / f"{study}.md"
    assert card.is_file(), f"experiments/{study}.md is missing"
    text = card.read_text()
    for part in ("**Question.**", "**Command.**", "**Conclusion.**", f"bnlab-train study={study}",
                 f"bnlab-report study={study}"):
        assert part in text, f"experiments/{study}.md lacks {part}"


def test_study_grid_sizes():
    assert len(cli.expand_jobs(["study=momentum"])[0]) == 10  # 2 batch sizes x 5 seeds
    assert len(cli.expand_jobs(["study=d2l"])[0]) == 10  # 10 seeds
    assert len(cli.expand_jobs(["study=update_ops"])[0]) == 6
    # the command line adds an axis to a study
    assert len(cli.expand_jobs(["study=update_ops", "bn.momentum=0.01,0.1"])[0]) == 12
    # and overrides one of its axes
    assert len(cli.expand_jobs(["study=update_ops", "seed=5"])[0]) == 2


def test_defaults_match_d2l():
    cfg = cli.validate_job([])
    assert (cfg.model.name.value, cfg.model.activation.value, cfg.bn.placement.value) == ("lenet", "sigmoid", "before_act")
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (1.0, 256, 10)
    assert cfg.data.name.value == "fashion_mnist" and cfg.bn.momentum == 0.1


def test_overrides_reach_the_dataclass():
    cfg = cli.validate_job(["bn.momentum=0.01", "data.batch_size=32", "optim.lr=0.1",
                            "bn.placement=after_act", "model.activation=relu", "bn.momentum=null"])
    assert cfg.bn.momentum is None and cfg.data.batch_size == 32 and cfg.optim.lr == 0.1
    assert cfg.bn.placement.value == "after_act" and cfg.model.activation.value == "relu"


def test_decay_converts_to_momentum():
    cfg = cli.validate_job(["bn.decay=0.9"])
    assert cfg.bn.momentum == pytest.approx(0.1, abs=1e-15) and cfg.bn.decay == 0.9
    assert cli.validate_job(["bn.decay=0.999"]).bn.momentum == pytest.approx(0.001)


BAD = [
    (["bn.foo=1"], "bn.foo"),
    (["+bn.foo=1"], "bn.foo"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["bn.placement=middle"], "bn.placement"),
    (["bn.momentum=1.5"], "bn.momentum"),
    (["bn.momentum=-0.1"], "bn.momentum"),
    (["bn.momentum=0.2", "bn.decay=0.9"], "bn.decay"),
    (["data.batch_size=1"], "data.batch_size"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["train.epochs=0"], "train.epochs"),
    (["model.activation=tanh"], "model.activation"),
    (["data.name=mnist"], "data.name"),
    (["bn.shadow_momenta=[0.1,2]"], "bn.shadow_momenta"),
    (["bn.ghost_batch_size=3"], "bn.ghost_batch_size"),  # not a divisor of 256
    (["bn.ghost_batch_size=1"], "bn.ghost_batch_size"),
    (["bn.freeze_at=11"], "bn.freeze_at"),  # after the last epoch
    (["bn.freeze_at=2", "bn.precise_samples=0"], "bn.precise_samples"),
    (["bn.precise_sizes=[1,100]"], "bn.precise_sizes"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["optim.milestones=[5,3]"], "optim.milestones"),
    (["optim.milestones=[10]"], "optim.milestones"),  # not before train.epochs
    (["optim.gamma=1.5"], "optim.gamma"),
    (["optim.warmup_epochs=10"], "optim.warmup_epochs"),
    (["train.eval_every=-2"], "train.eval_every"),
    (["train.eval_subset=0"], "train.eval_subset"),
    (["model.pool=min"], "model.pool"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_bad_override_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        cli.preflight(overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_bad_sweep_value_is_caught_before_any_job():
    with pytest.raises(ConfigError, match="bn.momentum"):
        cli.preflight(["-m", "bn.momentum=0.1,0.5,7"])


def test_batch_size_one_is_fine_without_bn():
    assert cli.validate_job(["data.batch_size=1", "bn.placement=none"]).data.batch_size == 1


def test_cli_bad_input_exits_with_one_line_and_writes_nothing(home, train_cmd):
    for args, field in [(["bn.placement=middle"], "bn.placement"), (["bn.momentum=1.5"], "bn.momentum"),
                        (["data.root=" + str(home)], "data.root"), (["train.epochs=0"], "train.epochs")]:
        code, _, err = train_cmd(*args)  # bnlab-train's main, in this process
        assert code == 2, (args, err)
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("WARN")]
        assert len(lines) == 1 and field in lines[0], err
        assert not (home / "runs").exists(), "bad input must write nothing"


def test_schema_fields_are_documented():
    """The schema is the documentation: one comment above every field."""
    src = (Path(cli.__file__).parent / "config.py").read_text().splitlines()
    for cls in [c for c in vars(__import__("bnlab.config", fromlist=["x"])).values()
                if dataclasses.is_dataclass(c) and c.__name__.endswith("Config") and c is not Config]:
        for f in dataclasses.fields(cls):
            idx = next(i for i, l in enumerate(src) if l.strip().startswith(f"{f.name}:"))
            assert src[idx - 1].strip().startswith("#"), f"{cls.__name__}.{f.name} has no comment"

"""Field roles: one table (bnlab.roles.ROLES) read by the config hash, the MLflow params, run names and
the report's groups; a (config group, seed) is counted once."""
from __future__ import annotations

import pandas as pd

from bnlab import describe as D
from bnlab.analysis import figures as F
from bnlab.analysis import report
from bnlab.analysis.runs import once_per_config
from bnlab.config import Config, DataName, Device, flatten, to_plain
from bnlab.roles import ROLES, Role, config_hash, field_role, groups_by


def test_every_key_of_the_table_is_a_field_of_the_schema():
    keys = set(flatten(to_plain(Config())))
    assert set(ROLES) <= keys
    for r in ROLES.values():
        assert r.only_when is None or r.only_when[0] in keys


def test_default_hash_is_the_one_stored_runs_have():
    assert config_hash(Config()) == "9f7271eea8d0dd64"


def test_execution_fields_do_not_change_the_hash_result_fields_do():
    base = config_hash(Config())
    c = Config()
    c.data.eval_batch_size, c.data.root, c.train.device, c.train.threads, c.train.progress = 512, "/x", Device.cpu, 1, False
    c.tracking.experiment, c.tracking.resume = "other", False
    assert config_hash(c) == base
    for change in (lambda c: setattr(c.bn, "momentum", 0.01), lambda c: setattr(c, "seed", 3),
                   lambda c: setattr(c.bn, "shadow_momenta", [0.01]), lambda c: setattr(c.data, "batch_size", 32)):
        c = Config()
        change(c)
        assert config_hash(c) != base
    # a field that does not apply is hashed at its default: Fashion-MNIST ignores the synthetic sizes
    c = Config()
    c.data.synthetic_train = 100
    assert config_hash(c) == base
    c.data.name = DataName.synthetic
    assert config_hash(c) != config_hash(Config(data=type(c.data)(name=DataName.synthetic)))


def test_params_names_and_groups_read_the_table():
    flat = flatten(to_plain(Config()))
    params = D.defining_params(flat)
    for key, r in ROLES.items():
        if r.role in (Role.execution, Role.bookkeeping):
            assert key not in params and not groups_by(key)
    assert "seed" in params and not groups_by("seed")
    assert "bn.shadow_momenta" in params and not groups_by("bn.shadow_momenta")
    assert D.run_name(["data.eval_batch_size=512", "train.device=cpu", "bn.momentum=0.01"]) == "mom=0.01"
    tags = D.run_tags(Config())
    assert tags["bnlab.data.eval_batch_size"] == "2000" and tags["bnlab.train.device"] == "auto"
    frame = pd.DataFrame({"seed": [0, 1], "train.device": ["cpu", "cuda"], "bn.momentum": [0.1, 0.1],
                          "bn.update_stats": [True, False]})
    assert F.varying(frame) == ["bn.update_stats"]
    assert field_role("model.kwargs.width").role == Role.result


def _runs(eval_bs, hash_prefix, t0):
    """The issue's case: smoke's 2 x 2 grid, then the same grid relaunched with another
    data.eval_batch_size (an execution field; the old hash held it, so the runs were trained again)."""
    rows = []
    for i, (upd, seed) in enumerate([(True, 0), (True, 1), (False, 0), (False, 1)]):
        rows.append({"run_id": f"{hash_prefix}{i}", "status": "FINISHED", "diverged": False,
                     "config_hash": f"{hash_prefix}{i}", "start_time": pd.Timestamp(t0 + i, unit="s", tz="UTC"),
                     "seed": seed, "bn.update_stats": upd, "data.batch_size": 32,
                     "final/val/acc": 0.5 + 0.1 * seed + (0.01 if hash_prefix == "b" else 0)})
    return rows


def test_the_double_count_case_gives_two_seeds_per_group():
    raw = pd.DataFrame(_runs(2000, "a", 0) + _runs(512, "b", 100))
    runs = once_per_config(raw)
    assert len(runs) == 4 and runs.attrs["duplicates"] == 4
    assert set(runs["run_id"]) == {"a0", "a1", "a2", "a3"}  # the first FINISHED of each (group, seed)
    s = report.summary_table(runs)
    assert list(s["n_seeds"]) == [2, 2] and list(s["val/acc:n"]) == [2, 2]
    assert list(s["n_collapsed"]) == [2, 2]
    assert "4 more runs of a group and seed already counted collapsed" in report.runs_text(runs)
    # a failed attempt is superseded by the FINISHED one; with no FINISHED one the latest attempt counts
    raw2 = raw.copy()
    raw2.loc[raw2["run_id"] == "a0", "status"] = "FAILED"
    kept = once_per_config(raw2)
    assert "b0" in set(kept["run_id"]) and "a0" not in set(kept["run_id"])
    alone = once_per_config(raw2[raw2["run_id"].isin(["a0"])])
    assert list(alone["run_id"]) == ["a0"] and alone["collapsed"].sum() == 0

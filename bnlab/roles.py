"""The table of field roles (ROLES): which config fields define a run's result, which only say how
or where it runs, which are bookkeeping; and the config hash that reads it. The hash, the MLflow
params and run names (bnlab.describe) and the report's grouping (bnlab.analysis.frames) all ask here."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Optional

from bnlab.config import Config, flatten, to_plain


class Role(str, Enum):
    result = "result"  # defines what the run computes: config hash, MLflow params, run names, report groups
    seed = "seed"  # the replicate: hash, params and names; the report averages over it, never groups by it
    extra = "extra"  # only adds metrics (training unchanged): hash and params; pooled in the report's groups
    execution = "execution"  # how or where the run executes: not in params, names or groups; hashed at its default
    bookkeeping = "bookkeeping"  # where the run is logged and how a sweep resumes: nowhere


@dataclass(frozen=True)
class FieldRole:
    role: Role
    # (other field, value): the field applies only when the other field has this value; otherwise it
    # is left out of the params and hashed at its default (data.synthetic_train with real data).
    only_when: Optional[tuple] = None


# THE table of field roles: every flat config key that is not simply a result field. Read by
# config_hash (below), describe.py (MLflow params, run names) and the report (analysis/frames.py).
ROLES: Dict[str, FieldRole] = {
    "seed": FieldRole(Role.seed),
    "data.root": FieldRole(Role.execution),  # where the same dataset files are read from
    "data.eval_batch_size": FieldRole(Role.execution),  # evaluation chunking: same numbers
    "train.device": FieldRole(Role.execution),  # where it runs
    "train.threads": FieldRole(Role.execution),  # CPU threads: speed only (tag bnlab.threads)
    "train.progress": FieldRole(Role.execution),  # a progress bar on a terminal
    "bn.shadow_momenta": FieldRole(Role.extra),  # extra running averages from the same batch statistics
    "data.synthetic_train": FieldRole(Role.result, ("data.name", "synthetic")),
    "data.synthetic_val": FieldRole(Role.result, ("data.name", "synthetic")),
    "model.hidden": FieldRole(Role.result, ("model.name", "mlp")),
    "tracking.uri": FieldRole(Role.bookkeeping),
    "tracking.experiment": FieldRole(Role.bookkeeping),
    "tracking.study": FieldRole(Role.bookkeeping),
    "tracking.resume": FieldRole(Role.bookkeeping),
}


def field_role(key: str) -> FieldRole:
    """The role of a flat config key (model.kwargs.<name> and unknown keys: result)."""
    return ROLES.get(key) or FieldRole(Role.result)


def applies(key: str, flat: Dict[str, Any]) -> bool:
    """False where the field's only_when condition does not hold for the flat config `flat`."""
    cond = field_role(key).only_when
    return cond is None or str(flat.get(cond[0])) == cond[1]


def is_param(key: str, flat: Dict[str, Any]) -> bool:
    """An MLflow param (and a key of run names): result, seed and extra fields that apply."""
    return field_role(key).role in (Role.result, Role.seed, Role.extra) and applies(key, flat)


def groups_by(key: str) -> bool:
    """Splits the report's config groups: result fields only."""
    return field_role(key).role == Role.result


def dedup_key(key: str) -> bool:
    """Identifies one (config group, seed) in the report: result fields and the seed."""
    return field_role(key).role in (Role.result, Role.seed)


# Later fields and the value each takes when it changes nothing (see config_hash).
_AS_BEFORE = {
    ("data", "path"): None, ("data", "synthetic_shape"): None, ("model", "target"): None, ("model", "kwargs"): {},
    ("model", "pool"): "avg", ("bn", "precise_sizes"): [], ("bn", "ghost_batch_size"): None, ("bn", "freeze_at"): None,
    ("optim", "schedule"): "constant", ("optim", "warmup_epochs"): 0.0, ("optim", "milestones"): [],
    ("optim", "gamma"): 0.1, ("train", "eval_every"): 0, ("train", "eval_subset"): None,
}
# Execution fields that the hash left out before field roles existed (the others it held, so they
# now enter it at their default value): both ways a stored run keeps its hash.
_HASH_LEFT_OUT = ("train.progress", "train.threads")


def config_hash(cfg: Config) -> str:
    """A stable hash of everything that changes a run's result: result, seed and extra fields as
    they are; execution fields and fields that do not apply (see ROLES) at their default value, so a
    relaunch that only runs differently (data.eval_batch_size, train.device, data.root) finds the
    finished run; bookkeeping left out."""
    plain = to_plain(cfg)
    flat = flatten(plain)
    default = flatten(to_plain(Config()))
    for key in flat:
        role = field_role(key).role
        group, _, name = key.rpartition(".")
        if not group or key.startswith("model.kwargs."):
            continue
        if role == Role.bookkeeping or key in _HASH_LEFT_OUT:
            plain[group].pop(name)
        elif role == Role.execution or not applies(key, flat):
            plain[group][name] = default[key]
    plain.pop("tracking")
    # Fields added after runs were first stored count only when they differ from the value that
    # means "as before", so those runs keep their hash (a relaunched study still skips them and the
    # report still counts each config once).
    for (group, key), before in _AS_BEFORE.items():
        if plain[group].get(key, before) == before:
            plain[group].pop(key, None)
    blob = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

"""What the MLflow UI shows of bnlab: run names, the params that define a run, descriptions,
MLflow's standard tags and each study experiment's tags (description, landing page, default
columns). Pure functions returning strings and dicts; tracking.py and sweep.py write them."""
from __future__ import annotations

import functools
import getpass
import json
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from bnlab.config import Config, flatten, to_plain
from bnlab.roles import Role, field_role, is_param

# ------------------------------------------------------------------------ params that define a run

# Which fields are params is the schema's table of field roles (bnlab.roles.ROLES): result, seed
# and extra fields that apply; execution fields are tags (bnlab.<key>) and bookkeeping is left out
# (the full resolved config is the run's config.yaml artifact).

def is_defining(key: str, flat: Mapping[str, object]) -> bool:
    """True if `key` is a param that defines the run whose flat config is `flat`."""
    return is_param(key, dict(flat))


def defining_params(flat: Mapping[str, object]) -> Dict[str, object]:
    """The params logged with a run: its flat config's result, seed and extra fields that apply."""
    return {k: v for k, v in flat.items() if is_defining(k, flat)}


def execution_tags(cfg: Config) -> Dict[str, str]:
    """The execution fields of a run as tags bnlab.<key> (device, eval batch size, data root, ...)."""
    from bnlab.store import TAG

    return {TAG + k: str(v) for k, v in flatten(to_plain(cfg)).items() if field_role(k).role == Role.execution}


def run_params(cfg: Config) -> Dict[str, object]:
    return defining_params(flatten(to_plain(cfg)))


def fixed_params(flat: Mapping[str, object], varying: Iterable[str]) -> Dict[str, object]:
    """A sweep's parent run holds what every one of its runs shares: the defining params minus the
    keys the sweep varies."""
    vary = set(varying)
    return {k: v for k, v in defining_params(flat).items() if k not in vary}


# ------------------------------------------------------------------------------------ run names

# Short names of the keys studies vary; any other key is named by its last component (or in full
# when two varying keys share that component, e.g. bn.momentum and optim.momentum).
KEY_ALIASES = {
    "seed": "s", "data.batch_size": "bs", "optim.lr": "lr", "bn.placement": "bn", "bn.momentum": "mom",
    "bn.decay": "decay", "bn.update_stats": "update", "model.activation": "act", "model.name": "model",
    "data.name": "data", "train.epochs": "ep", "data.train_subset": "n", "optim.momentum": "sgd_mom",
    "optim.weight_decay": "wd", "bn.precise_samples": "precise", "bn.shadow_momenta": "shadows",
    "bn.running_var": "var", "bn.impl": "impl", "bn.affine": "gb", "bn.ghost_batch_size": "gh",
    "bn.freeze_at": "fz", "model.pool": "pool", "optim.schedule": "sched", "optim.gamma": "gamma",
    "optim.milestones": "miles", "optim.warmup_epochs": "warm", "train.eval_every": "every",
    "bn.precise_sizes": "sizes",
}
VALUE_ALIASES = {"before_act": "pre", "after_act": "post", "sigmoid": "sigm", "true": "on",
                 "false": "off", "None": "null"}
NAME_WIDTH = 20  # the MLflow 3.17 runs table shows about this many characters of a name


def short_key(key: str, others: Sequence[str] = ()) -> str:
    if key in KEY_ALIASES:
        return KEY_ALIASES[key]
    last = key.rsplit(".", 1)[-1]
    clash = any(o != key and (KEY_ALIASES.get(o) or o.rsplit(".", 1)[-1]) == last for o in others)
    return key if clash else last


def short_value(raw: str) -> str:
    v = str(raw).strip().strip("'\"")
    if v.lower() in VALUE_ALIASES:
        return VALUE_ALIASES[v.lower()]
    if v in VALUE_ALIASES:
        return VALUE_ALIASES[v]
    try:
        if any(c in v for c in ".eE") and not v.isalpha():
            return f"{float(v):g}"  # 1.0 -> 1, 0.0100 -> 0.01, 1e-3 -> 0.001
    except ValueError:
        pass
    return v.replace(" ", "")


def _parse(override: str):
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def run_name(overrides: Sequence[str], varying: Optional[Sequence[str]] = None) -> str:
    """A job's name: `key=value` of the keys its sweep varies, in the grid's order, with short keys
    and values (bs=512 bn=none s=2), the seed last; keys that do not vary are left out. A single run (varying
    None) names the defining keys it overrides; 'default' when there are none."""
    values = {}
    for o in overrides:
        key, value = _parse(o)
        if key.startswith("hydra") or key == "study" or field_role(key).role in (Role.execution, Role.bookkeeping):
            continue
        values[key] = value
    keys = [k for k in (varying if varying is not None else values) if k in values]
    keys = [k for k in keys if k != "seed"] + [k for k in keys if k == "seed"]  # seeds last
    name = " ".join(f"{short_key(k, keys)}={short_value(values[k])}" for k in keys)
    return name[:250] or "default"


def varying_keys(jobs: Sequence[Sequence[str]]) -> List[str]:
    """The keys that take more than one value over a grid of jobs (lists of overrides), in the
    order they first appear."""
    seen: Dict[str, set] = {}
    for job in jobs:
        for o in job:
            key, value = _parse(o)
            seen.setdefault(key, set()).add(value)
    return [k for k, vals in seen.items() if len(vals) > 1 and not k.startswith("hydra")]


def parent_name(study: str, launched: Optional[float] = None) -> str:
    """The sweep's parent run: the study and its launch time (local time, month-day hour:minute: the
    runs table shows about 20 characters, and Created has the full date), e.g. smoke 11-24 13:40."""
    return f"{study} {time.strftime('%m-%d %H:%M', time.localtime(launched))}"


# ------------------------------------------------------------------------------- descriptions

def study_header(study: str) -> Dict[str, str]:
    """The `# Key: text` lines at the top of the study's file wherever it is on the config search
    path (Question, Run, Report, Size; bnlab.studies.header); {} for an unknown study."""
    from bnlab import studies

    return studies.header(study)


def _builtin(study: str) -> bool:
    from bnlab import studies

    return studies.where("study", study) == studies.BUILTIN


def _command(text: str) -> str:
    """'bnlab-train study=lr   (54 runs, ...)' -> 'bnlab-train study=lr'."""
    return text.split("(")[0].strip()


def experiment_description(study: str, n_runs: Optional[int] = None,
                           varying: Sequence[str] = ()) -> str:
    """Markdown for the study experiment's description (mlflow.note.content): the question, the
    command, where its answer is (the report section, the figures attached to the sweep run)."""
    h = study_header(study)
    run = _command(h.get("Run", "")) or f"bnlab-train study={study}"
    report = _command(h.get("Report", "")) or f"bnlab-report study={study}"
    lines = [f"**Question.** {h['Question']}" if h.get("Question") else f"**Study** `{study}`.", ""]
    size = f" ({n_runs} runs)" if n_runs else ""
    lines += [f"**Run:** `{run}`{size}. **Answer:** `{report}` writes the section `## {study}` of "
              f"results/REPORT.md and results/{study}/ (figures, summary.csv), and attaches them to "
              f"the latest sweep run of this experiment (Artifacts, folder report/)."
              + (f" Study card: experiments/{study}.md." if _builtin(study) else ""), ""]
    if varying:
        names = ", ".join(f"`{short_key(k, varying)}` = {k}" for k in varying)
        lines += [f"**Run names** show what varies: {names}."]
    if h.get("Size"):
        lines += ["", f"**Size.** {h['Size']}"]
    return "\n".join(lines)


def sweep_description(study: str, n_runs: int, varying: Sequence[str], overrides: Sequence[str]) -> str:
    """The parent run's description: what the sweep launched, and where its answer appears."""
    keys = ", ".join(varying) or "nothing"
    cmd = " ".join(["bnlab-train", *overrides])
    return (f"Sweep of `{study}`: {n_runs} runs varying {keys} (the child runs); params here are "
            f"the ones they share. Launched by `{cmd}`. After `bnlab-report study={study}`, "
            f"the figures and summary.csv are under Artifacts, report/.")


def run_description(cfg: Config) -> str:
    """One line that says what the run trains and how (mlflow.note.content of the run)."""
    from bnlab.data import TITLES
    from bnlab.models import MODELS

    m, b, d, o, t = cfg.model, cfg.bn, cfg.data, cfg.optim, cfg.train
    model = MODELS[m.name.value].title(m)  # the model and data registries name them
    if not b.enabled:
        bn = "no BN"
    else:
        where = "before" if b.placement.value == "before_act" else "after"
        mom = "cumulative average" if b.momentum is None else f"momentum {b.momentum:g}"
        upd = "" if b.update_stats else ", running statistics never updated"
        bn = f"BN {where} the activation ({mom}{upd})"
    data = TITLES[d.name](d)
    subset = f" ({d.train_subset} training examples)" if d.train_subset else ""
    sgd = f"SGD lr {o.lr:g}" + (f", momentum {o.momentum:g}" if o.momentum else "")
    return (f"{model}, {bn}; {sgd}, batch {d.batch_size}, {t.epochs} epoch"
            f"{'s' if t.epochs != 1 else ''} on {data}{subset}; seed {cfg.seed}")


# ---------------------------------------------------------------------------------------- tags

def _git(root: Path, *args: str) -> Optional[str]:
    """`git -C ROOT ARGS`'s output, stripped; None when git is missing or fails."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_root() -> Optional[Path]:
    """The git checkout bnlab runs from (an editable install), or None: an installed wheel lives in
    site-packages, which may sit inside some other repository (a project's .venv), so the
    checkout's top level must be the folder that holds bnlab/ and pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return None
    top = _git(root, "rev-parse", "--show-toplevel")
    return root if top and Path(top).resolve() == root else None


# The commit and the dirty flag are read once a process: the code that runs is what it imported.
@functools.lru_cache(maxsize=1)
def code_commit() -> Optional[str]:
    """The git commit of the code that runs (bnlab's checkout; None for an installed package).
    Not the project folder's: the store may live anywhere, the code is what the commit identifies."""
    root = code_root()
    sha = _git(root, "rev-parse", "HEAD") if root is not None else None
    return sha if sha and len(sha) == 40 else None


@functools.lru_cache(maxsize=1)
def code_dirty() -> Optional[bool]:
    """Whether bnlab's checkout has changes to tracked files (None: no checkout, or git failed)."""
    root = code_root()
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if root is not None else None
    return None if status is None else bool(status)


def standard_tags(source: str) -> Dict[str, str]:
    """MLflow's own tags, which its UI shows as Source, Version and User: the git commit of the
    project checkout, the command that made the run (`source`), the user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    from bnlab import __version__

    tags = {"mlflow.source.name": source, "mlflow.source.type": "LOCAL", "mlflow.user": user,
            TAG_VERSION: __version__}
    commit = code_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def source_name(study: Optional[str]) -> str:
    return f"bnlab-train study={study}" if study else "bnlab-train"


def run_tags(cfg: Config) -> Dict[str, str]:
    """Tags of one training run besides bnlab's own: description, MLflow's standard tags, threads."""
    from bnlab.store import TAG

    return {"mlflow.note.content": run_description(cfg), **standard_tags(source_name(cfg.tracking.study)),
            **execution_tags(cfg), TAG + "threads": str(cfg.train.threads) if cfg.train.threads else "default"}


TAG_VERSION = "bnlab.version"  # the bnlab release that made the run (tracking.git_info writes it too)

# Columns of the study's default runs view: the keys the study varies, then the answer's metrics.
VIEW_METRICS = ("val/acc", "val/acc_precise_bn", "gap/acc")
VIEW_KEY = "bnlab"  # the URL ?viewStateShareKey=bnlab opens the view stored under this key


def view_state(varying: Sequence[str]) -> str:
    """The runs table of a study as MLflow 3.17's "share view" stores it (an experiment tag
    mlflow.sharedViewState.<key>, JSON): varying params and the answer's metrics as columns."""
    cols = [f"params.`{k}`" for k in varying] + [f"metrics.`{m}`" for m in VIEW_METRICS]
    return json.dumps({"orderByKey": "attributes.start_time", "orderByAsc": False,
                       "selectedColumns": cols + ["attributes.`Source`"], "columnOrder": cols})


def experiment_tags(study: Optional[str], n_runs: Optional[int], varying: Sequence[str]) -> Dict[str, str]:
    """Tags of a sweep's experiment: its columns as a shared view (see view_state) and, for a
    study, its description (shown above the runs table)."""
    tags = {f"mlflow.sharedViewState.{VIEW_KEY}": view_state(varying)}
    if study:
        tags["mlflow.note.content"] = experiment_description(study, n_runs, varying)
    return tags


def runs_url(base: str, experiment_id: str, view: bool = True) -> str:
    """The URL of an experiment's runs table. MLflow 3.17 opens an experiment on its GenAI overview
    unless the URL says workflowType=machine_learning; the shared view (the /runs route with
    viewStateShareKey) adds the study's columns (see view_state), with a banner that offers to make
    them the user's own default ("Override saved view")."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    if view:
        return f"{url}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{url}?workflowType=machine_learning"

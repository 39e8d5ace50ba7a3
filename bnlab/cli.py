"""bnlab-train's console script. The only module that imports Hydra: validate every job of the command first
(one clear line on bad input, nothing written), then compose -> to_object -> train."""
from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bnlab import studies
from bnlab.config import Config, ConfigError
from bnlab.store import project_home

log = logging.getLogger("bnlab")

# Hydra's own command-line flags: with these nothing is trained, so nothing is validated.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
               "--shell-completion", "-sc", "--resolve", "--package", "-p"}


CONF_SOURCE = studies.BUILTIN  # the packaged config tree (bnlab/conf), Hydra's primary config source


def conf_dir() -> Path:
    """The packaged config folder (bnlab/conf)."""
    return studies.builtin_dir()


def _prepare_env() -> None:
    # bnlab/conf/train.yaml places Hydra's job folders under ${oc.env:BNLAB_HOME}; an environment
    # variable (not a resolver) so that joblib/submitit worker processes resolve it too.
    if not os.environ.get("BNLAB_HOME"):
        os.environ["BNLAB_HOME"] = str(project_home())
    from bnlab.config import register_configs

    register_configs()


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def searchpath_override() -> str:
    """hydra.searchpath=[...] with the user's config sources (studies.user_sources)."""
    return "hydra.searchpath=[" + ",".join(_quote(s) for s in studies.user_sources()) + "]"


def user_config(args: Sequence[str]) -> List[str]:
    """Fold the user's config folders into one search path: Hydra's own --config-dir/-cd and
    hydra.searchpath=[...] go to $BNLAB_CONFIG_DIR (so that every check, the help, the descriptions
    and the worker processes see them), and the command gets one hydra.searchpath override with
    every user source (studies.user_sources: those, $BNLAB_CONFIG_DIR, <project>/conf)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out, added, i = [], [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if flag in ("--config-path", "-cp"):
            raise ConfigError(f"{flag} replaces bnlab's own configs; add yours with --config-dir DIR, "
                              f"${studies.ENV}=DIR or a conf/ folder in the project folder")
        if flag in ("--config-dir", "-cd"):
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag} needs a folder")
                value, i = args[i + 1], i + 1
            if not Path(value).expanduser().is_dir():
                raise ConfigError(f"{flag}: no such folder {value!r}")
            added.append(str(Path(value).expanduser().resolve()))
        elif a.startswith("hydra.searchpath="):
            try:
                paths = OverridesParser.create().parse_overrides([a])[0].value()
            except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
                raise ConfigError(f"hydra.searchpath must be a list such as [file://DIR], got {a[17:]!r}") from e
            if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
                raise ConfigError(f"hydra.searchpath must be a list such as [file://DIR], got {a[17:]!r}")
            added += [x if x.startswith("pkg://") else studies._as_source(x)[len("file://"):] for x in paths]
        else:
            out.append(a)
        i += 1
    if added:
        before = [e for e in os.environ.get(studies.ENV, "").split(os.pathsep) if e]
        os.environ[studies.ENV] = os.pathsep.join(added + [e for e in before if e not in added])
    if not studies.user_sources():
        return out
    # Next to the first override: Hydra's parser takes the overrides as one run of positionals.
    first = next((i for i, a in enumerate(out) if not a.startswith("-") and "=" in a), len(out))
    return out[:first] + [searchpath_override()] + out[first:]


def _compose(overrides: Sequence[str], return_hydra_config: bool = False):
    """Compose train.yaml from the packaged configs and the user's (as bnlab-train does)."""
    from hydra import initialize_config_module

    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return _compose_here(overrides, return_hydra_config)


def _compose_here(overrides: Sequence[str], return_hydra_config: bool):
    """_compose, inside an initialized Hydra (initialize_config_module)."""
    from hydra import compose

    ovr = [o for o in overrides if not o.startswith("hydra.searchpath=")]
    if studies.user_sources():
        ovr.append(searchpath_override())
    return compose("train", overrides=ovr, return_hydra_config=return_hydra_config)


# ---------------------------------------------------------------------------------- preflight

def _error_line(e: BaseException) -> str:
    """One line naming the field and what is allowed, from Hydra/OmegaConf/bnlab exceptions."""
    from omegaconf.errors import OmegaConfBaseException

    seen = e
    while seen is not None:
        if isinstance(seen, ConfigError):
            return str(seen)
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            msg = getattr(seen, "msg", str(seen)).strip().splitlines()[0]
            return f"{seen.full_key}: {msg}"
        seen = seen.__cause__ or seen.__context__
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def expand_jobs(overrides: Sequence[str]) -> Tuple[List[List[str]], bool]:
    """The override list of every job the command would launch (the basic sweeper's cartesian
    product of the command line and the study's hydra.sweeper.params), and whether it is a multirun."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed = [o for o, p in zip(overrides, parser.parse_overrides(list(overrides))) if not p.is_sweep_override()]
    full = _compose(fixed, return_hydra_config=True)
    multirun = str(full.hydra.mode) == "RunMode.MULTIRUN"
    params: Dict[str, List[str]] = {}
    study_params = full.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in study_params.items()] + list(overrides)
    for p in parser.parse_overrides(lines):
        key = p.get_key_element()
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        vals = list(p.sweep_string_iterator()) if p.is_sweep_override() else [p.get_value_element_as_str()]
        params[key] = [f"{key}={v}" for v in vals]  # the command line wins over the study
    grid = [list(c) for c in itertools.product(*params.values())] or [[]]
    hydra_only = [o for o in overrides if o.split("=")[0].lstrip("+~").startswith("hydra")
                  and not o.startswith("hydra.searchpath=")]
    return [hydra_only + g for g in grid], multirun


def _check_momentum_or_decay(job: Sequence[str]) -> None:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in job}
    if "bn.momentum" in keys and "bn.decay" in keys:
        raise ConfigError("set bn.momentum or bn.decay, not both")


def validate_job(job: List[str]) -> Config:
    """The typed config of one job (its overrides as `bnlab-train` gets them): one whole compose."""
    _check_momentum_or_decay(job)
    return _typed(_compose([o for o in job if not o.startswith("hydra")], return_hydra_config=True))


def validate_jobs(jobs: Sequence[List[str]]) -> List[Config]:
    """validate_job of every job (a sweep's grid), composing train.yaml once per set of
    config-group overrides.

    A sweep's jobs mostly differ in config values (seeds, lr, momentum), and a compose costs about
    0.1 s here. Hydra composes in two steps: the defaults list (from the config-group overrides,
    such as model=resnet20) gives a config, and then the other overrides are applied to it, in
    order, by ConfigLoaderImpl._apply_overrides_to_config. Here the first step runs once per
    distinct set of group overrides and the second, the same Hydra function, on a copy for each
    job: the result is the config validate_job's whole compose gives (tests/test_config.py
    compares them on every kind of override, on the user's own config groups, on errors, and on
    jobs of every study). An override is a group override as Hydra decides it: its key
    names a config group of the search path and its value is not a dict; a sweep override stays
    with the group overrides, so that Hydra's compose refuses it as before."""
    import copy

    from hydra import initialize_config_module
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    bases: Dict[Tuple[str, ...], object] = {}
    groups: Dict[str, List[str]] = {}
    out: List[Config] = []
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        searchpath = [searchpath_override()] if studies.user_sources() else []

        def is_group(key: str) -> bool:
            # on the search path a compose of train.yaml uses: bnlab's configs and the user's
            parent, _, name = key.rpartition("/")
            if parent not in groups:
                groups[parent] = loader.get_group_options(parent, results_filter=ObjectType.GROUP,
                                                          config_name="train", overrides=searchpath)
            return name in groups[parent]

        for job in jobs:
            _check_momentum_or_decay(job)
            ovr = [o for o in job if not o.startswith("hydra")]
            group, values = [], []
            for o, p in zip(ovr, parser.parse_overrides(ovr)):
                if not p.is_sweep_override() and (isinstance(p.value(), dict) or not is_group(p.key_or_group)):
                    values.append(p)
                else:
                    group.append(o)
            key = tuple(group)
            if key not in bases:
                bases[key] = _unhydra(_compose_here(group, return_hydra_config=True))
            dcfg = copy.deepcopy(bases[key])
            ConfigLoaderImpl._apply_overrides_to_config(values, dcfg)  # as the compose would
            out.append(_to_config(dcfg))
    return out


def _typed(dcfg) -> Config:
    """The Config of a composed train.yaml (Hydra node included), after bnlab's own checks."""
    return _to_config(_unhydra(dcfg))


def _unhydra(dcfg):
    """A composed train.yaml without its Hydra node (what compose(return_hydra_config=False) returns),
    once its config-group choices are checked."""
    from omegaconf import open_dict

    check_shadowing(dict(dcfg.hydra.runtime.choices))
    with open_dict(dcfg):
        del dcfg["hydra"]
    return dcfg


def _to_config(dcfg) -> Config:
    from omegaconf import OmegaConf

    # `+key=value` opens a structured node, and to_object would then drop the key silently.
    from bnlab.config import flatten, to_plain

    extra = set(flatten(OmegaConf.to_container(dcfg))) - set(flatten(to_plain(Config())))
    extra = {k for k in extra if not k.startswith("model.kwargs.")}  # a custom model's own arguments
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"{key}: no such field (see bnlab/config.py or `bnlab-train --cfg job`)")
    return OmegaConf.to_object(dcfg)


def available_studies() -> List[str]:
    return studies.options("study")


def check_shadowing(choices: Dict[str, Optional[str]]) -> None:
    """Hydra's search path cannot shadow a packaged config: a user file named like a built-in one
    that the command selects (or a user train.yaml) would be silently ignored. Refused instead."""
    for group, name in [("", "train")] + [(g, n) for g, n in choices.items() if n and not g.startswith("hydra")]:
        clash = studies.shadowing(group, str(name))
        if clash:
            what = f"built-in {group}={name}" if group else "primary config train.yaml"
            raise ConfigError(f"{clash} has the name of bnlab's {what}, which Hydra would compose instead "
                              f"(a packaged config cannot be shadowed): rename your file")


def check_study(overrides: Sequence[str]) -> None:
    """One known study per command (several would share one sweep, parent run and experiment)."""
    known = available_studies()
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") != "study":
            continue
        if key.startswith("+"):
            raise ConfigError(f"{key}: study is a config group bnlab-train always has; write study={value} (no +)")
        if "," in value or value.strip().startswith(("choice(", "range(", "glob(")):
            names = re.sub(r"^\w+\((.*)\)$", r"\1", value.strip()).split(",")
            raise ConfigError(f"study: one study per command, got {value!r}; run them one by one: "
                              + "; ".join(f"bnlab-train study={n.strip()}" for n in names if n.strip()))
        if value not in known:
            where = ", ".join(s.replace("file://", "") for s in studies.user_sources()) or "none"
            raise ConfigError(f"study must be one of {', '.join(known)}, got {value!r} (study/ of bnlab's configs "
                              f"and of your config folders: {where}; add one with --config-dir DIR or ./conf)")


STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
HTTP_CHECK_S = 5.0


def check_store(uri: Optional[str]) -> None:
    """The store URI has a known scheme, a SQLite store's folder is writable, a server answers."""
    import urllib.error
    import urllib.request

    from bnlab.store import resolve_uri, sqlite_path

    u = resolve_uri(uri)
    scheme = u.split("://", 1)[0] if "://" in u else ""
    if scheme.split("+")[0] not in STORE_SCHEMES:
        raise ConfigError(f"tracking.uri must be null (the project's store), sqlite:///PATH, http(s)://HOST:PORT "
                          f"or a database URL ({', '.join(STORE_SCHEMES[3:])}), got {u!r}")
    path = sqlite_path(u)
    if scheme == "sqlite":
        if path is None:
            raise ConfigError(f"tracking.uri must be sqlite:///PATH for a SQLite store, got {u!r}")
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"tracking.uri: the store {path} is not writable")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"tracking.uri: the store's folder {folder} is not writable (the default store is "
                              f"runs/mlflow.db of the project folder: the working directory, or $BNLAB_HOME)")
    elif scheme in ("http", "https"):
        try:
            urllib.request.urlopen(u.rstrip("/") + "/health", timeout=HTTP_CHECK_S).close()
        except urllib.error.HTTPError:
            pass  # it answers; MLflow itself reports a wrong path
        except (OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            raise ConfigError(f"tracking.uri={u} does not answer within {HTTP_CHECK_S:g} s ({why}); start the "
                              "server (bnlab-ui --port PORT) or fix the URI") from e


def check_runnable(cfgs: Sequence[Config]) -> None:
    """What the config alone cannot know: the device (the training set size is checked with the data)."""
    from bnlab.config import Device

    if any(c.train.device == Device.cuda for c in cfgs):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device must be auto or cpu on this machine (no CUDA device is available), "
                              "got 'cuda'")


def preflight(args: Sequence[str]) -> Tuple[int, bool]:
    """Validate every job, the data, the device and the store before anything runs or is written.
    Returns (number of jobs, multirun); raises ConfigError/DataError with one line."""
    from bnlab.data import preflight_data

    overrides = [a for a in args if not a.startswith("-")]
    check_study(overrides)
    try:
        jobs, multirun = expand_jobs(overrides)
        multirun = multirun or "-m" in args or "--multirun" in args
        cfgs = validate_jobs(jobs)
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf composition and validation errors
        raise ConfigError(_error_line(e)) from e
    check_runnable(cfgs)
    # Every dataset read and checked once (files, labels, batch size vs training set), every model
    # built on its data.
    preflight_data(cfgs)
    for uri in {c.tracking.uri for c in cfgs}:
        check_store(uri)
    _URIS[:] = sorted({c.tracking.uri or "" for c in cfgs})
    return len(cfgs), multirun


_URIS: List[str] = []  # the stores of the command's jobs ("" = the default), for store_hint


def store_hint(uris: Sequence[str]) -> str:
    """The one line that points MLflow's own tools (mlflow ui, mlflow runs list) at the store."""
    from bnlab.store import resolve_uri, sqlite_path

    uri = resolve_uri((list(uris) or [""])[0] or None)
    path = sqlite_path(uri)
    if path is not None:
        try:
            uri = f"sqlite:///{path.resolve().relative_to(Path.cwd().resolve()).as_posix()}"
        except ValueError:
            pass
    return (f"bnlab-train: MLflow's own tools on these runs: export MLFLOW_TRACKING_URI={uri} "
            f"MLFLOW_BACKEND_STORE_URI={uri}  (then mlflow ui, mlflow runs list; or bnlab-ui)")


# ---------------------------------------------------------------------------------- the job

def _task(dcfg) -> Dict[str, float]:
    """One Hydra job: typed config, claim (or skip) its grid point, a tracked training run. In a
    sweep every outcome is recorded for the final count, and nothing raises: one failed job must
    not stop the others, but the first store failure stops the jobs after it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from bnlab import faults, outcomes, sweep
    from bnlab.store import StoreError, resolve_uri, root_cause
    from bnlab.train import train

    cfg: Config = OmegaConf.to_object(dcfg)
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    if sweep.slurm_task() is not None and "submitit" in sys.modules:  # a task of hydra/launcher=slurm
        from bnlab.slurm import requeue_survives_its_own_signal

        requeue_survives_its_own_signal()
    if not multirun:
        context = sweep.job_context(cfg, hc, list(hc.overrides.task), multirun)
        result = train(cfg, context.tracker, extra_tags=context.tags, config_text=OmegaConf.to_yaml(dcfg))
        _summary(result, context.tracker)
        return result
    num, sdir = int(hc.job.num), hc.sweep.dir
    broken = outcomes.store_failure(sdir)
    if broken:
        outcomes.record_outcome(sdir, num, "not_run", broken)
        log.info("job %s not run: the store failed earlier in this sweep", num)
        return {"not_run": 1.0}
    if cfg.train.threads is None:
        cfg.train.threads = sweep.threads_for_launcher(hc)
    context = None
    try:
        context = sweep.job_context(cfg, hc, list(hc.overrides.task), multirun)
        if context.skip_reason:
            log.info("skipped: %s", context.skip_reason)
            outcomes.record_outcome(sdir, num, "skipped", context.skip_reason)
            return {"skipped": 1.0}
        result = train(cfg, context.tracker, extra_tags=context.tags, config_text=OmegaConf.to_yaml(dcfg))
    except KeyboardInterrupt:
        if context is not None:
            sweep.interrupted(context)
        raise
    except Exception as e:
        line = _error_line(e)
        if isinstance(e, StoreError) or _store_trouble(e):
            if not isinstance(e, StoreError):
                line = f"store {resolve_uri(cfg.tracking.uri)} failed ({root_cause(e)})"
            log.error("job %s: %s", num, line)
            outcomes.record_outcome(sdir, num, "store_failed", line)
            return {"store_failed": 1.0}
        log.error("job %s failed: %s", num, line)  # its run is FAILED in the store with the error
        outcomes.record_outcome(sdir, num, "failed", line)
        return {"failed": 1.0}
    outcomes.record_outcome(sdir, num, "diverged" if "diverged_epoch" in result else "finished")
    faults.point("job_done", job=num, uri=cfg.tracking.uri)
    _summary(result, context.tracker)
    return result


def _store_trouble(e: BaseException) -> bool:
    """An error raised by MLflow or the database (not by training) anywhere in the chain."""
    seen = e
    while seen is not None:
        mod = type(seen).__module__
        if mod.startswith(("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _summary(m: Dict[str, float], tracker) -> None:
    if "diverged_epoch" in m:
        print(f"diverged at epoch {int(m['diverged_epoch'])} (train/loss {m['train/loss']})", flush=True)
    else:
        extra = "".join(f"  {k} {m[k]:.4f}" for k in ("val/acc_batch_stats", "val/acc_precise_bn") if k in m)
        print(f"train/acc {m['train/acc']:.4f}  val/acc {m['val/acc']:.4f}  gap/acc {m['gap/acc']:+.4f}{extra}",
              flush=True)
    print(f"logged to {tracker.where()}", flush=True)


def study_header(name: str) -> Tuple[str, str]:
    """(question, size) from the header comments of a study file (studies.run_size)."""
    return studies.run_size(name)


def help_text() -> str:
    lines = ["bnlab-train: train a network (LeNet, MLP, ResNet-20 or your own) with Batch Normalization variants; "
             "every run goes to MLflow.", "",
             "Studies (bnlab-train study=NAME runs the whole sweep; one study per command):"]
    for name in available_studies():
        q, size = study_header(name)
        mine = "" if studies.where("study", name) == studies.BUILTIN else "(yours) "
        lines.append(textwrap.fill(f"{name:<15} {mine}{q}" + (f" [{size}]" if size else ""), width=100,
                                   initial_indent="  ", subsequent_indent=" " * 18))
    folders = ", ".join(s.replace("file://", "") for s in studies.user_sources())
    lines += ["", "Your own studies, models and datasets: conf/study/, conf/model/, conf/data/ of the project folder",
              f"(the working directory or $BNLAB_HOME), --config-dir DIR or ${studies.ENV}=DIR; now: {folders or 'none'}."]
    lines += ["", "Examples:",
              "  bnlab-train                                   one run: LeNet-BN as in d2l 7.5",
              "  bnlab-train bn.momentum=0.01 data.batch_size=32 optim.lr=0.1",
              "  bnlab-train -m bn.momentum=0.01,0.1 seed=0,1   any grid from the command line",
              "  bnlab-train study=lr hydra/launcher=joblib hydra.launcher.n_jobs=2",
              "  bnlab-train --cfg job                          print the resolved config", "",
              "Every field, its unit and convention: bnlab/config.py. A sweep prints 'N finished, M failed,",
              "K skipped, D diverged' and exits 1 when a job failed. Then: bnlab-report study=NAME.", "",
              "Hydra's own help follows.", ""]
    return "\n".join(lines)


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    """bnlab-train: Hydra's command line over bnlab/conf/train.yaml (`-m` or `study=NAME` for sweeps)."""
    import hydra

    from bnlab import faults, sweep
    from bnlab.data import DataError
    from bnlab.store import bound_http_retries

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    _prepare_env()
    bound_http_retries()
    try:
        args = user_config(args)
    except ConfigError as e:
        print(f"bnlab-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if "--help" in args or "-h" in args:
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `bnlab-train --help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
    if not _INFO_FLAGS.intersection(args):
        try:
            faults.active()  # a test's fault list: an unknown name stops here
            n, multirun = preflight(args)
        except (ConfigError, DataError, faults.FaultError) as e:
            print(f"bnlab-train: error: {e}", file=sys.stderr)
            sys.exit(2)
        if multirun:
            print(f"bnlab-train: {n} job(s) validated", flush=True)
            os.environ["BNLAB_N_JOBS"] = str(n)
    sys.argv = [sys.argv[0]] + args
    hydra.main(version_base="1.3", config_path=CONF_SOURCE, config_name="train")(_task)()
    if not _INFO_FLAGS.intersection(args):
        print(store_hint(_URIS), flush=True)
    if sweep.LAST_RESULT is not None and sweep.LAST_RESULT.failed:
        sys.exit(1)

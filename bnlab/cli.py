"""bnlab-train's console script. The only module that imports Hydra: validate every job of the command first
(one clear line on bad input, nothing written), then compose -> to_object -> train."""
from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bnlab.config import Config, ConfigError, DataName
from bnlab.tracking import TAG, project_home

log = logging.getLogger("bnlab")

# Hydra's own command-line flags: with these nothing is trained, so nothing is validated.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
               "--shell-completion", "-sc", "--resolve", "--package", "-p"}


def conf_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "conf"


def _prepare_env() -> None:
    # conf/train.yaml places Hydra's job folders under ${oc.env:BNLAB_HOME}; an environment
    # variable (not a resolver) so that joblib/submitit worker processes resolve it too.
    os.environ.setdefault("BNLAB_HOME", str(project_home()))
    from bnlab.config import register_configs

    register_configs()


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
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        fixed = [o for o, p in zip(overrides, parser.parse_overrides(list(overrides)))
                 if not p.is_sweep_override()]
        full = compose("train", overrides=fixed, return_hydra_config=True)
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
    hydra_only = [o for o in overrides if o.split("=")[0].lstrip("+~").startswith("hydra")]
    return [hydra_only + g for g in grid], multirun


def validate_job(job: List[str]) -> Config:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    keys = {o.split("=", 1)[0].lstrip("+~") for o in job}
    if "bn.momentum" in keys and "bn.decay" in keys:
        raise ConfigError("set bn.momentum or bn.decay, not both")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        dcfg = compose("train", overrides=[o for o in job if not o.startswith("hydra")])
    # `+key=value` opens a structured node, and to_object would then drop the key silently.
    from bnlab.config import flatten, to_plain

    extra = set(flatten(OmegaConf.to_container(dcfg))) - set(flatten(to_plain(Config())))
    extra = {k for k in extra if not k.startswith("model.kwargs.")}  # a custom model's own arguments
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"{key}: no such field (see bnlab/config.py or `bnlab-train --cfg job`)")
    return OmegaConf.to_object(dcfg)


def preflight(args: Sequence[str]) -> Tuple[int, bool]:
    """Validate every job and the data it needs before anything runs or is written.
    Returns (number of jobs, multirun); raises ConfigError/DataError with one line."""
    from bnlab.data import preflight_data

    overrides = [a for a in args if not a.startswith("-")]
    try:
        jobs, multirun = expand_jobs(overrides)
        multirun = multirun or "-m" in args or "--multirun" in args
        cfgs = [validate_job(j) for j in jobs]
    except ConfigError:
        raise
    except Exception as e:  # Hydra/OmegaConf composition and validation errors
        raise ConfigError(_error_line(e)) from e
    preflight_data(cfgs)  # every dataset read and checked once, every model built on its data
    return len(cfgs), multirun


# ---------------------------------------------------------------------------------- the job

def _task(dcfg) -> Dict[str, float]:
    """One Hydra job: typed config, resume check, a tracked training run."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from bnlab import sweep
    from bnlab.train import train

    cfg: Config = OmegaConf.to_object(dcfg)
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    task_overrides = list(hc.overrides.task)
    if cfg.train.threads is None:
        cfg.train.threads = sweep.threads_for_launcher(hc)
    context = sweep.job_context(cfg, hc, task_overrides, multirun)
    if context.skip_reason:
        log.info("skipped: %s", context.skip_reason)
        return {"skipped": 1.0}
    text = OmegaConf.to_yaml(dcfg)
    try:
        result = train(cfg, context.tracker, extra_tags=context.tags, config_text=text)
    except KeyboardInterrupt:
        sweep.interrupted(context)
        raise
    except Exception as e:
        if not multirun:
            raise
        # In a sweep one failed run (recorded FAILED in the store) must not stop the others.
        log.error("job %s failed: %s", hc.job.num, _error_line(e))
        return {"failed": 1.0}
    _summary(result, context.tracker)
    return result


def _summary(m: Dict[str, float], tracker) -> None:
    if "diverged_epoch" in m:
        print(f"diverged at epoch {int(m['diverged_epoch'])} (train/loss {m['train/loss']})", flush=True)
    else:
        extra = "".join(f"  {k} {m[k]:.4f}" for k in ("val/acc_batch_stats", "val/acc_precise_bn") if k in m)
        print(f"train/acc {m['train/acc']:.4f}  val/acc {m['val/acc']:.4f}  gap/acc {m['gap/acc']:+.4f}{extra}",
              flush=True)
    print(f"logged to {tracker.where()}", flush=True)


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    """bnlab-train: Hydra's command line over conf/train.yaml (`-m` or `study=NAME` for sweeps)."""
    import hydra

    from bnlab.data import DataError

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    _prepare_env()
    if not _INFO_FLAGS.intersection(args):
        try:
            n, multirun = preflight(args)
        except (ConfigError, DataError) as e:
            print(f"bnlab-train: error: {e}", file=sys.stderr)
            sys.exit(2)
        if multirun:
            print(f"bnlab-train: {n} job(s) validated", flush=True)
    sys.argv = [sys.argv[0]] + args
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")(_task)()

"""Runs keep their model: `model_artifact` is what a run saves at its end (tracking.MODEL_ARTIFACT),
`load_run(run_id)` rebuilds the model from it, and `bnlab-diagnose RUN_ID` prints its BN diagnosis."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from bnlab.config import Config, ConfigError, to_plain
from bnlab.store import MODEL_ARTIFACT, client, resolve_uri


def model_artifact(model: nn.Module, cfg: Config, ds) -> Tuple[Dict[str, torch.Tensor], str]:
    """(the final state dict on the CPU, the resolved config with the example shape and number of
    classes as JSON text): the arguments of tracker.log_model, all load_run needs to rebuild the model.
    float32 weights as trained: 190 KB for LeNet, 1.1 MB for ResNet-20."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"config": to_plain(cfg), "shape": list(ds.shape), "classes": ds.classes}
    source = model_source(cfg)
    if source:
        meta["source"] = source
    text = json.dumps(meta, indent=1)
    return state, text


def model_source(cfg: Config) -> Optional[Dict[str, str]]:
    """model=custom: the module that defines model.target, as {module, file, text}, so that the run
    rebuilds its model in any folder (load_run); None for a built-in model or a module without a
    readable source file. Only that one module is kept, not what it imports."""
    import importlib
    import inspect

    if cfg.model.name.value != "custom" or not cfg.model.target:
        return None
    name = cfg.model.target.partition(":")[0]
    try:
        path = inspect.getsourcefile(importlib.import_module(name))
        return {"module": name, "file": str(Path(path).resolve()), "text": Path(path).read_text()}
    except (ImportError, TypeError, OSError):
        return None


def provide_module(source: Dict[str, str]) -> None:
    """Make the module a run was trained with importable under its name: the saved source, unless
    the module found on the import path now has exactly that text (then it is used as it is)."""
    import importlib
    import importlib.util
    import inspect
    import os
    import sys

    name, text = source["module"], source["text"]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        here = importlib.import_module(name)
        if Path(inspect.getsourcefile(here)).read_text() == text:
            return
    except Exception:  # noqa: BLE001 - not importable here, or broken: the saved source is used
        pass
    spec = importlib.util.spec_from_loader(name, loader=None, origin=source.get("file"))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = source.get("file")
    sys.modules[name] = module  # before exec: a dataclass in the module looks itself up there
    exec(compile(text, source.get("file") or f"<{name}>", "exec"), module.__dict__)


class RunError(ValueError):
    """The run does not exist or has no saved model; the message says which and why."""


@dataclass
class LoadedRun:
    """A finished run's model (eval mode, CPU) with the config it was trained with."""

    run_id: str
    model: nn.Module
    config: Config
    shape: Tuple[int, ...]
    classes: int


def load_run(run_id: str, tracking_uri: Optional[str] = None) -> LoadedRun:
    """Rebuild the model of run `run_id` (tracking_uri: as tracking.uri, null = the project's store)
    from the state dict and resolved config it saved at its end; returns it in eval mode on the CPU."""
    from mlflow.exceptions import MlflowException

    from bnlab.models import build_model

    uri = resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # Reading must not create an empty store.
        raise RunError(f"no MLflow store at {uri} (set tracking.uri=URI)")
    c = client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise RunError(f"no run {run_id!r} in {tracking_uri or 'the project store'} "
                       f"({str(e).splitlines()[0]})") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, MODEL_ARTIFACT, tmp)
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing file
            raise RunError(f"run {run_id} ({run.info.status}) has no {MODEL_ARTIFACT} artifact: only runs that "
                           f"finished without diverging save their model ({type(e).__name__})") from None
        saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = json.loads(saved["config"])
    cfg = from_plain(meta["config"])
    shape, classes = tuple(meta["shape"]), int(meta["classes"])
    if meta.get("source"):
        provide_module(meta["source"])
    model = build_model(cfg.model, cfg.bn, shape, classes)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return LoadedRun(run_id, model, cfg, shape, classes)


def diagnose_run(loaded: LoadedRun, num_samples: Optional[int] = None, data_root: Optional[str] = None):
    """bnlab.diagnose on a loaded run with its own data: training batches of the run's batch size
    (precise BN), validation batches of the same size (batch statistics as in training)."""
    from bnlab.bn import diagnose
    from bnlab.data import eval_batches, load_data, train_batches

    cfg = loaded.config
    if data_root is not None:
        cfg.data.root = data_root
    ds = load_data(cfg.data, loaded.shape)
    n = num_samples or cfg.bn.precise_samples or 10000
    n = min(n, len(ds.x_train))
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = cfg.data.batch_size
    return diagnose(loaded.model, train_batches(ds.x_train, ds.y_train, bs, gen),
                    list(eval_batches(ds.x_val, ds.y_val, bs)), num_samples=n)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """bnlab-diagnose RUN_ID [tracking.uri=URI] [data.root=DIR] [--num-samples N]: the BN diagnosis
    of a finished run's saved model on its own data."""
    import os

    from bnlab.data import DataError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr for errors
    ap = argparse.ArgumentParser(prog="bnlab-diagnose", description=main.__doc__)
    ap.add_argument("run_id")
    ap.add_argument("overrides", nargs="*", help="tracking.uri=URI (default: the project's store), data.root=DIR")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="training examples for the population statistics (default: the run's bn.precise_samples)")
    a = ap.parse_args(argv)
    keys = {"tracking.uri": None, "data.root": None}
    try:
        for o in a.overrides:
            key, eq, value = o.partition("=")
            if not eq or key not in keys:
                raise ConfigError(f"{o}: bnlab-diagnose takes tracking.uri=URI and data.root=DIR")
            keys[key] = value or None
        if a.num_samples is not None and a.num_samples < 2:
            raise ConfigError(f"--num-samples must be >= 2, got {a.num_samples}")
        loaded = load_run(a.run_id, keys["tracking.uri"])
        d = diagnose_run(loaded, a.num_samples, keys["data.root"])
    except (ConfigError, RunError, DataError) as e:
        print(f"bnlab-diagnose: error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg = loaded.config
    print(f"run {a.run_id}: model={cfg.model.name.value} data={cfg.data.name.value} "
          f"bn.momentum={cfg.bn.momentum} bn.update_stats={cfg.bn.update_stats}")
    print(d)


def from_plain(d: dict) -> Config:
    """The inverse of to_plain: a Config from plain values (e.g. a saved run's config), checked."""
    import typing

    def build(cls, values: dict):
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.__name__} needs a mapping, got {values!r}")
        hints = typing.get_type_hints(cls)
        unknown = set(values) - set(hints)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: no such field in {cls.__name__}")
        kwargs = {}
        for k, v in values.items():
            t = hints[k]
            if isinstance(t, type) and issubclass(t, Enum):
                v = t(v)
            elif hasattr(t, "__dataclass_fields__"):
                v = build(t, v)
            kwargs[k] = v
        return cls(**kwargs)

    return build(Config, d)

"""MLflow -> typed pandas frames; the only module of bnlab that reads MLflow.

A SQLite store is read with a handful of SQL queries, one per table (MLflow's per-run
get_metric_history loop costs one round trip per run and metric: MLflow issues 7365 and 2730). An
HTTP tracking server is read with paged search_runs plus the server's bulk history endpoint (100
runs per request and metric), falling back to get_metric_history per run where that endpoint is absent.

Frames (one row per run; sweep parent runs and deleted runs are left out):
  run_id, run_name, experiment, study, status   status: FINISHED / FAILED / KILLED / RUNNING
  role, diverged, diverged_epoch                diverged: the bnlab.diverged tag, or a non-finite
                                                last train/loss (a run killed mid-divergence)
  parent_run_id, config_hash, git_commit, git_dirty, error, start_time, end_time (UTC timestamps)
  <param>             every logged param under its own name (bn.momentum, data.batch_size, ...),
                      cast to the schema type of bnlab.config: int, float, bool, str (enums as their
                      value), lists as Python lists. A null (None) is NaN in float columns (so
                      bn.momentum NaN = cumulative average), <NA> in nullable Int64 columns, None
                      elsewhere. Params the schema does not know stay strings.
  final/<metric>      the metric's value at its last step (MLflow's latest metric)
  tags.<key>          every tag as logged (tags.bnlab.overrides, tags.mlflow.parentRunId, ...)
load_curves: one row per logged point: run_id, metric, step, value, then the run columns above
(without final/* and tags.*). `step` is the epoch for epoch-level metrics (no prefix) and the
global SGD step for step-level ones (prefix step/, train.eval_every); figures.step_wide pivots those. MLflow stores NaN as is_nan and +-inf as +-1.8e308: both come back
as NaN / +-inf.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import sys
import types
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import pandas as pd

from bnlab.analysis.frames import once_per_config
from bnlab.config import DIVERGED_LOSS
from bnlab.store import TAG, resolve_uri

FINAL = "final/"
TAGS = "tags."
RUN_INFO = ["run_id", "run_name", "experiment", "study", "status", "role", "diverged",
            "diverged_epoch", "parent_run_id", "config_hash", "git_commit", "git_dirty", "error",
            "start_time", "end_time"]
CURVE_COLUMNS = ["run_id", "metric", "step", "value"]
_FLOAT_MAX = sys.float_info.max  # MLflow stores +-inf as +-DBL_MAX
_BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
_BULK_MAX_RUNS = 100  # the server's limit of run ids per bulk request
_BULK_MAX_RESULTS = 25000  # the server's cap on points per bulk request (a full answer may be cut)


class StoreNotFound(FileNotFoundError):
    """The SQLite file of a sqlite:/// tracking URI does not exist (nothing was ever logged there)."""


# ------------------------------------------------------------------------ params: schema types

@dataclasses.dataclass(frozen=True)
class ParamType:
    kind: str  # int | float | bool | str | enum | list
    optional: bool  # None is allowed (Optional[...] in the schema)
    elem: str = ""  # element kind of a list


def _kind(t) -> str:
    if isinstance(t, type) and issubclass(t, Enum):
        return "enum"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(t, "str")


def param_schema() -> Dict[str, ParamType]:
    """Flattened param name -> its type, read from the dataclass fields of bnlab.config.Config."""
    from bnlab.config import Config

    out: Dict[str, ParamType] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")
                continue
            optional = False
            if typing.get_origin(t) in (typing.Union, types.UnionType):
                args = typing.get_args(t)
                optional = type(None) in args
                t = next(a for a in args if a is not type(None))
            if typing.get_origin(t) in (list, List, tuple):
                elem = (typing.get_args(t) or (str,))[0]
                out[prefix + f.name] = ParamType("list", optional, _kind(elem))
            else:
                out[prefix + f.name] = ParamType(_kind(t), optional)

    walk(Config, "")
    return out


_BOOLS = {"true": True, "false": False}


def _cast_scalar(kind: str, raw: str):
    if kind == "bool":
        return _BOOLS[raw.strip().lower()]
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw  # str, enum: the value string as logged


def cast_param(spec: ParamType, raw):
    """One logged param string -> its schema type; 'None' (and a missing param) -> None."""
    if raw is None or (isinstance(raw, float) and raw != raw) or raw == "None":
        return None
    if spec.kind == "list":
        vals = ast.literal_eval(raw)
        return [_cast_scalar(spec.elem, str(v)) for v in vals]
    return _cast_scalar(spec.kind, raw)


def _typed_column(key: str, raw: pd.Series, spec: Optional[ParamType]) -> pd.Series:
    if spec is None:  # a param the schema does not know (an older or newer bnlab): keep the string
        return raw.astype(object).where(raw.notna(), None)
    cache = {}
    values = []
    for v in raw.tolist():
        k = v if isinstance(v, str) else None
        if k not in cache:
            try:
                cache[k] = cast_param(spec, k)
            except (ValueError, KeyError, SyntaxError) as e:
                warnings.warn(f"param {key}: cannot read {k!r} as {spec.kind} ({e}); left missing")
                cache[k] = None
        values.append(cache[k])
    missing = any(v is None for v in values)
    if spec.kind == "float":
        return pd.Series([float("nan") if v is None else v for v in values], index=raw.index,
                         dtype="float64", name=key)
    if spec.kind == "int":
        dtype = "Int64" if (spec.optional or missing) else "int64"
        return pd.Series([pd.NA if v is None else v for v in values], index=raw.index, dtype=dtype, name=key)
    if spec.kind == "bool":
        dtype = "boolean" if missing else "bool"
        return pd.Series([pd.NA if v is None else v for v in values], index=raw.index, dtype=dtype, name=key)
    return pd.Series(values, index=raw.index, dtype=object, name=key)


def type_params(wide: pd.DataFrame) -> pd.DataFrame:
    """Cast a frame of logged param strings (one column per param) to the schema types."""
    schema = param_schema()
    order = [k for k in schema if k in wide.columns] + sorted(k for k in wide.columns if k not in schema)
    return pd.DataFrame({k: _typed_column(k, wide[k], schema.get(k)) for k in order}, index=wide.index)


def _value(v: float) -> float:
    if v >= _FLOAT_MAX:
        return float("inf")
    if v <= -_FLOAT_MAX:
        return float("-inf")
    return float(v)


def _fix_values(values: pd.Series, is_nan: Optional[pd.Series] = None) -> pd.Series:
    v = values.astype("float64")
    v = v.mask(v >= _FLOAT_MAX, float("inf")).mask(v <= -_FLOAT_MAX, float("-inf"))
    if is_nan is not None:
        v = v.mask(is_nan.astype(bool), float("nan"))
    return v


# ---------------------------------------------------------------------------- store backends

class _Raw:
    """What both backends return: long frames of one experiment's active runs."""

    def __init__(self, runs, params, tags, latest):
        self.runs = runs  # run_id, run_name, status, start_time, end_time (ms)
        self.params = params  # run_id, key, value
        self.tags = tags  # run_id, key, value
        self.latest = latest  # run_id, key, value (floats, NaN/inf restored)


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(uri).database
    if not db or db == ":memory:":
        raise ValueError(f"not a SQLite file store: {uri}")
    return Path(db)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class _SqliteStore:
    """Reads MLflow's tables directly (schema checked against a store created by mlflow 3.17)."""

    def __init__(self, path: Path):
        import sqlite3

        if not path.is_file():
            raise StoreNotFound(f"no MLflow store at {path} (nothing logged yet?)")
        # Read-only: a report never migrates or locks a store that jobs may be writing to.
        self.con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)

    def close(self) -> None:
        self.con.close()

    def q(self, sql: str, params=()) -> pd.DataFrame:
        return pd.read_sql_query(sql, self.con, params=params)

    def experiment_id(self, name: str) -> Optional[int]:
        exps = self.q("SELECT * FROM experiments WHERE name = ? AND lifecycle_stage = 'active'", (name,))
        if exps.empty:
            return None
        if len(exps) > 1 and "workspace" in exps.columns:  # one name per workspace since mlflow 3.x
            exps = exps[exps["workspace"] == "default"] if (exps["workspace"] == "default").any() else exps
        return int(exps["experiment_id"].iloc[0])

    _ACTIVE = "JOIN runs r ON r.run_uuid = x.run_uuid WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'"

    def raw(self, exp_id: int) -> _Raw:
        runs = self.q("SELECT run_uuid AS run_id, name AS run_name, status, start_time, end_time FROM runs "
                      "WHERE experiment_id = ? AND lifecycle_stage = 'active'", (exp_id,))
        params = self.q(f"SELECT x.run_uuid AS run_id, x.key, x.value FROM params x {self._ACTIVE}", (exp_id,))
        tags = self.q(f"SELECT x.run_uuid AS run_id, x.key, x.value FROM tags x {self._ACTIVE}", (exp_id,))
        latest = self.q(f"SELECT x.run_uuid AS run_id, x.key, x.value, x.is_nan FROM latest_metrics x "
                        f"{self._ACTIVE}", (exp_id,))
        latest["value"] = _fix_values(latest["value"], latest.pop("is_nan"))
        return _Raw(runs, params, tags, latest)

    def metrics(self, exp_id: int, run_ids: Sequence[str], keys: Optional[Sequence[str]]) -> pd.DataFrame:
        """Every point of every metric of the experiment's active runs: ONE query."""
        sql = (f"SELECT x.run_uuid AS run_id, x.key AS metric, x.step, x.value, x.is_nan, x.timestamp "
               f"FROM metrics x {self._ACTIVE}")
        args: list = [exp_id]
        if keys is not None:
            sql += f" AND x.key IN ({','.join('?' * len(keys))})"
            args += list(keys)
        m = self.q(sql, args)
        m = m[m["run_id"].isin(set(run_ids))]
        m["value"] = _fix_values(m["value"], m.pop("is_nan"))
        return m

    def experiments(self) -> pd.DataFrame:
        return self.q("SELECT e.name, e.experiment_id, COUNT(r.run_uuid) AS n_runs FROM experiments e "
                      "LEFT JOIN runs r ON r.experiment_id = e.experiment_id AND r.lifecycle_stage = 'active' "
                      "WHERE e.lifecycle_stage = 'active' GROUP BY e.experiment_id, e.name ORDER BY e.name")


class _ClientStore:
    """Any other tracking URI through MlflowClient: an HTTP server (bulk history endpoint) or a
    database SQLAlchemy reaches (per-run history)."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._bulk_ok = _is_http(uri)
        self._keys: Dict[str, List[str]] = {}

    def close(self) -> None:
        pass

    def experiment_id(self, name: str) -> Optional[str]:
        exp = self.client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            return None
        return exp.experiment_id

    def raw(self, exp_id: str) -> _Raw:
        from mlflow.entities import ViewType

        runs, params, tags, latest = [], [], [], []
        token = None
        while True:
            page = self.client.search_runs([exp_id], run_view_type=ViewType.ACTIVE_ONLY,
                                           max_results=50000, page_token=token)
            for r in page:
                i, d = r.info, r.data
                runs.append((i.run_id, i.run_name, i.status, i.start_time, i.end_time))
                params += [(i.run_id, k, v) for k, v in d.params.items()]
                tags += [(i.run_id, k, v) for k, v in d.tags.items()]
                latest += [(i.run_id, k, _value(v)) for k, v in d.metrics.items()]
                self._keys[i.run_id] = list(d.metrics)
            token = page.token
            if not token:
                break
        return _Raw(pd.DataFrame(runs, columns=["run_id", "run_name", "status", "start_time", "end_time"]),
                    pd.DataFrame(params, columns=["run_id", "key", "value"]),
                    pd.DataFrame(tags, columns=["run_id", "key", "value"]),
                    pd.DataFrame(latest, columns=["run_id", "key", "value"]))

    def metrics(self, exp_id: str, run_ids: Sequence[str], keys: Optional[Sequence[str]],
                run_keys: Optional[Dict[str, List[str]]] = None) -> pd.DataFrame:
        """`run_keys` (run id -> its metric names, known from a load_runs frame) saves a search."""
        if run_keys is None:
            if any(r not in self._keys for r in run_ids):
                self.raw(exp_id)  # learn which metric keys each run has
            run_keys = self._keys
        by_key: Dict[str, List[str]] = {}
        for r in run_ids:
            for k in run_keys.get(r, []):
                if keys is None or k in keys:
                    by_key.setdefault(k, []).append(r)
        jobs = [(ids[i:i + _BULK_MAX_RUNS], k) for k, ids in sorted(by_key.items())
                for i in range(0, len(ids), _BULK_MAX_RUNS)]
        # A few requests in flight: the server's workers and the client's JSON parsing overlap.
        with ThreadPoolExecutor(max_workers=4) as pool:
            rows = [row for part in pool.map(lambda job: self.history(*job), jobs) for row in part]
        m = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])
        m["value"] = _fix_values(m["value"])
        return m

    def history(self, run_ids: Sequence[str], key: str) -> list:
        """All points of one metric for up to 100 runs: one bulk request where the server has the
        endpoint (split in halves if the server's 25,000-point cap may have cut it)."""
        if self._bulk_ok:
            try:
                got = self._bulk(run_ids, key)
            except _NoBulk:
                self._bulk_ok = False
            else:
                if len(got) < _BULK_MAX_RESULTS:
                    return got
                if len(run_ids) > 1:
                    h = len(run_ids) // 2
                    return self.history(run_ids[:h], key) + self.history(run_ids[h:], key)
        rows = []
        for r in run_ids:  # the slow path: one paged request per run
            rows += [(r, key, m.step, m.value, m.timestamp) for m in self.client.get_metric_history(r, key)]
        return rows

    def _bulk(self, run_ids: Sequence[str], key: str) -> list:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        args = [("run_id", r) for r in run_ids] + [("metric_key", key), ("max_results", _BULK_MAX_RESULTS)]
        resp = http_request(get_default_host_creds(self.uri), _BULK_ENDPOINT, "GET", params=args,
                            raise_on_status=False)
        if resp.status_code in (404, 405, 501):
            raise _NoBulk()
        if resp.status_code != 200:
            raise RuntimeError(f"{_BULK_ENDPOINT} answered {resp.status_code}: {resp.text[:300]}")
        return [(m["run_id"], m["key"], int(m.get("step", 0)), m["value"], int(m.get("timestamp", 0)))
                for m in resp.json().get("metrics", [])]

    def experiments(self) -> pd.DataFrame:
        from mlflow.entities import ViewType

        rows = []
        for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50000):
            n = len(self.client.search_runs([e.experiment_id], max_results=1))
            rows.append((e.name, e.experiment_id, n))
        return pd.DataFrame(rows, columns=["name", "experiment_id", "n_runs"]).sort_values("name")


class _NoBulk(Exception):
    pass


def _open(uri: Optional[str]):
    uri = resolve_uri(uri)
    path = _sqlite_path(uri)
    return _SqliteStore(path) if path is not None else _ClientStore(uri)


# ---------------------------------------------------------------------------- frames

def _pivot(long: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    if long.empty:
        return pd.DataFrame(index=index)
    wide = long.pivot(index="run_id", columns="key", values="value")
    wide.columns.name = None
    return wide.reindex(index)


def _assemble(experiment: str, raw: _Raw) -> pd.DataFrame:
    runs = raw.runs.drop_duplicates("run_id").set_index("run_id", drop=False)
    runs.index.name = None
    tags = _pivot(raw.tags, runs.index)
    role = tags.get(TAG + "role", pd.Series(None, index=runs.index, dtype=object))
    keep = ~role.eq("sweep").fillna(False).astype(bool)  # a sweep's parent run holds no results
    runs, tags = runs[keep.to_numpy()], tags[keep.to_numpy()]
    params = type_params(_pivot(raw.params, runs.index))
    latest = _pivot(raw.latest, runs.index).astype("float64")
    latest = latest[sorted(latest.columns)].add_prefix(FINAL)

    def tag(key: str) -> pd.Series:
        col = tags.get(key, pd.Series(None, index=runs.index, dtype=object))
        return col.astype(object).where(col.notna(), None)

    out = pd.DataFrame(index=runs.index)
    out["run_id"] = runs["run_id"].astype(object)
    out["run_name"] = runs["run_name"].astype(object)
    out["experiment"] = experiment
    out["study"] = tag(TAG + "study").fillna(experiment) if len(runs) else pd.Series(dtype=object)
    out["status"] = runs["status"].astype(object)
    out["role"] = tag(TAG + "role")
    # Diverged: tagged by train(), or a logged last train/loss that breaks the divergence rule
    # (NaN/inf or above DIVERGED_LOSS: a run killed while diverging, or logged before the rule).
    loss = raw.latest[raw.latest["key"] == "train/loss"]
    bad_loss = set(loss.loc[~loss["value"].map(lambda v: math.isfinite(v) and v <= DIVERGED_LOSS), "run_id"])
    out["diverged"] = (tag(TAG + "diverged").eq("true").fillna(False).astype(bool)
                       | runs["run_id"].isin(bad_loss))
    out["diverged_epoch"] = pd.to_numeric(tag(TAG + "diverged_epoch"), errors="coerce").astype("Int64")
    out["parent_run_id"] = tag("mlflow.parentRunId")
    out["config_hash"] = tag(TAG + "config_hash")
    out["git_commit"] = tag(TAG + "git_commit")
    dirty = tag(TAG + "git_dirty").map({"true": True, "false": False, None: pd.NA})
    out["git_dirty"] = dirty.astype("boolean")
    out["error"] = tag(TAG + "error")
    for c in ("start_time", "end_time"):
        out[c] = pd.to_datetime(pd.to_numeric(runs[c], errors="coerce"), unit="ms", utc=True)
    tag_cols = tags[sorted(tags.columns)].add_prefix(TAGS)
    tag_cols = tag_cols.astype(object).where(tag_cols.notna(), None)
    out = pd.concat([out, params, latest, tag_cols], axis=1)
    return out.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)


def _empty_runs(experiment: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in RUN_INFO}).assign(
        experiment=pd.Series(dtype=object), diverged=pd.Series(dtype=bool))


def load_runs(experiment: str, uri: Optional[str] = None) -> pd.DataFrame:
    """One row per run of `experiment` (see the module docstring for the columns). Deleted runs and
    sweep parent runs (tag bnlab.role = sweep) are left out; every status is kept. An experiment
    that does not exist gives an empty frame; a sqlite:/// file that does not exist raises StoreNotFound."""
    store = _open(uri)
    try:
        return _load_runs(store, experiment)
    finally:
        store.close()


def _load_runs(store, experiment: str) -> pd.DataFrame:
    exp_id = store.experiment_id(experiment)
    if exp_id is None:
        return _empty_runs(experiment)
    raw = store.raw(exp_id)
    runs = _assemble(experiment, raw) if not raw.runs.empty else raw.runs
    if runs.empty:
        return _empty_runs(experiment)  # e.g. only a sweep's parent run
    return once_per_config(runs)


def load_curves(experiment: str, uri: Optional[str] = None, metrics: Optional[Iterable[str]] = None,
                *, runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Every logged point of the experiment's runs as a tidy frame: run_id, metric, step (= epoch),
    value, then the run's columns (params, status, diverged, ...; no final/* or tags.*).
    `metrics` restricts the metric names; `runs` (a load_runs frame of the same experiment)
    restricts the runs and saves reading them again. One value per (run, metric, step): where a
    step was logged twice, the latest timestamp wins."""
    keys = None if metrics is None else sorted(set(metrics))
    store = _open(uri)
    try:
        if runs is None:
            runs = _load_runs(store, experiment)
        exp_id = store.experiment_id(experiment)
        if exp_id is None or runs.empty or (keys is not None and not keys):
            points = pd.DataFrame({"run_id": pd.Series(dtype=object), "metric": pd.Series(dtype=object),
                                   "step": pd.Series(dtype="int64"), "value": pd.Series(dtype="float64"),
                                   "timestamp": pd.Series(dtype="int64")})
        elif isinstance(store, _ClientStore):
            # The metric names are the frame's final/<metric> columns: no second search_runs. (A
            # run without one of them gets an empty answer; a null final value may be a logged NaN.)
            names = [c[len(FINAL):] for c in runs.columns if c.startswith(FINAL)]
            points = store.metrics(exp_id, runs["run_id"].tolist(), keys, {r: names for r in runs["run_id"]})
        else:
            points = store.metrics(exp_id, runs["run_id"].tolist(), keys)
    finally:
        store.close()
    points = points.astype({"step": "int64", "value": "float64"})
    points = (points.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable")
              .drop_duplicates(["run_id", "metric", "step"], keep="last")[CURVE_COLUMNS])
    cols = [c for c in runs.columns if not c.startswith((FINAL, TAGS))]
    return points.merge(runs[cols], on="run_id", how="left", validate="many_to_one").reset_index(drop=True)


def list_experiments(uri: Optional[str] = None) -> pd.DataFrame:
    """The store's active experiments: name, experiment_id, n_runs (active runs, parents included;
    over HTTP only 0 or 1, as a cheap 'has runs')."""
    store = _open(uri)
    try:
        return store.experiments().reset_index(drop=True)
    finally:
        store.close()

"""Shared frame helpers of the report: which runs are usable, which params split config groups (the
schema's table of field roles), group selection and labels. Frames in, frames or text out."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import pandas as pd


CHANCE = 0.1  # 10 classes: Fashion-MNIST and the synthetic set

FINAL = "final/"

SHADOW = "final/val/acc_shadow/"

STEP = "step/"

RUN_COLUMNS = {"run_id", "run_name", "experiment", "study", "status", "role", "diverged", "diverged_epoch",
               "parent_run_id", "config_hash", "git_commit", "git_dirty", "error", "start_time", "end_time",
               "metric", "step", "value", "momentum_source", "collapsed"}


def hashable(s: pd.Series) -> pd.Series:
    return s.map(lambda v: tuple(v) if isinstance(v, list) else v) if s.dtype == object else s


def is_missing(v) -> bool:
    """None, NaN and pd.NA (a nullable column's missing value) alike; a list is never missing."""
    if v is None or v is pd.NA:
        return True
    return isinstance(v, float) and math.isnan(v)


def same(col: pd.Series, v) -> pd.Series:
    """A boolean mask of the rows of `col` equal to `v` (missing equals missing, never a value)."""
    if is_missing(v):
        return col.map(is_missing).astype(bool)
    return col.map(lambda x: (not is_missing(x)) and bool(x == v)).astype(bool)


def param_columns(df: pd.DataFrame) -> List[str]:
    return [c for c in df.columns if c not in RUN_COLUMNS and not c.startswith((FINAL, "tags."))]


def varying(df: pd.DataFrame, exclude: Iterable[str] = ()) -> List[str]:
    """Config params that take more than one value (seed and execution settings excluded)."""
    from bnlab.roles import groups_by

    skip = set(exclude)
    out = []
    for c in param_columns(df):
        # Only result fields split groups (bnlab.roles.ROLES): the seed is averaged over, extra
        # fields only add metrics, execution fields say where and how a run executed.
        if c in skip or not groups_by(c):
            continue
        if hashable(df[c]).nunique(dropna=False) > 1:
            out.append(c)
    return out


def split_runs(runs: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, int], int]:
    """(usable runs: FINISHED and not diverged, {status: count} of runs left out, n diverged)."""
    if runs.empty or "status" not in runs:
        return runs, {}, 0
    finished = runs["status"].eq("FINISHED")
    diverged = runs["diverged"].astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    left = runs.loc[~finished, "status"].value_counts().to_dict()
    counts = {str(k): int(v) for k, v in sorted(left.items())}
    return runs[finished & ~diverged], counts, int((finished & diverged).sum())


def left_out_text(left: Dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in left.items())


def run_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run from a runs or curves frame (for the footnote counts)."""
    return frame.drop_duplicates("run_id") if "metric" in frame else frame


def usable_curves(curves: pd.DataFrame) -> pd.DataFrame:
    if curves.empty:
        return curves
    return curves[curves["status"].eq("FINISHED") & ~curves["diverged"].astype(bool)]


def final_col(frame: pd.DataFrame, metric: str) -> pd.Series:
    return frame[FINAL + metric] if FINAL + metric in frame else pd.Series(dtype=float)


def usable(runs: pd.DataFrame) -> pd.DataFrame:
    return split_runs(runs)[0]


def fmt_value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "None"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def momentum_label(m: float) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "None (cumulative)"
    if m == 0:
        return "0 (never updated)"
    return f"{m:g} (decay {1 - m:g})"


def group_label(row, cols: Sequence[str]) -> str:
    if not cols:
        return "all runs"
    parts = []
    for c in cols:
        v = row[c]
        parts.append(f"momentum {momentum_label(v)}" if c == "bn.momentum" else f"{c}={fmt_value(v)}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------ one run per (group, seed)

COLLAPSE_RULE = ("one run per (config group, seed): the first FINISHED one, else the latest attempt; "
                 "execution and bookkeeping fields (bnlab.roles.ROLES) do not tell runs apart")


def identity_columns(runs: pd.DataFrame) -> List[str]:
    """The param columns that identify one (config group, seed): result fields and the seed (by the
    schema's table of roles; a param the schema does not know counts as a result field)."""
    from bnlab.roles import dedup_key

    skip = RUN_COLUMNS
    return [c for c in runs.columns if c not in skip and not c.startswith((FINAL, "tags.")) and dedup_key(c)]


def _identity(runs: pd.DataFrame) -> pd.Series:
    cols = identity_columns(runs)
    if not cols:
        return runs["config_hash"]
    def norm(v):
        if isinstance(v, list):
            return tuple(v)
        return None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else v
    return pd.Series([repr(tuple(norm(v) for v in row)) for row in runs[cols].itertuples(index=False)],
                     index=runs.index)


def once_per_config(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per (config group, seed) (COLLAPSE_RULE): the first FINISHED one, else the latest
    attempt. A store may hold one config trained twice (two sweeps at once before grid points were
    claimed; a relaunch that changed only execution fields before those were hashed at their
    default), which would count as extra seeds; a failed attempt that a resume retried is
    superseded too. Column `collapsed`: how many other runs each kept run stands for; their total
    is frame.attrs["duplicates"]. Runs with neither params nor a config hash are all kept."""
    key = _identity(runs)
    keyed = runs[key.notna()].assign(_key=key[key.notna()])
    by_start = keyed.sort_values("start_time", kind="stable")
    done = by_start["status"].eq("FINISHED")
    fin = by_start[done].drop_duplicates("_key")  # the first FINISHED
    rest = by_start[~done & ~by_start["_key"].isin(fin["_key"])]
    rest = rest.drop_duplicates("_key", keep="last")  # no FINISHED one: the latest attempt
    kept = pd.concat([fin, rest])
    sizes = keyed.groupby("_key").size()
    collapsed = dict(zip(kept["run_id"], kept["_key"].map(sizes).astype(int) - 1))
    keep = set(kept["run_id"]) | set(runs.loc[key.isna(), "run_id"])
    out = runs[runs["run_id"].isin(keep)].reset_index(drop=True)
    out["collapsed"] = out["run_id"].map(collapsed).fillna(0).astype(int)
    out.attrs["duplicates"] = int(len(runs) - len(out))
    return out

"""The report's shared kits on their own: stats.py (intervals, paired differences, their text),
frames.py (usable runs, groups by field role, missing values), plot.py (bands, seed lines, frames of a
figure, the default figure)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from bnlab.analysis import frames as fr
from bnlab.analysis import plot as P
from bnlab.analysis import stats as S

# Student-t 97.5% quantiles (any table; e.g. scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.mark.parametrize("df, q", sorted(T975.items()))
def test_t_quantile_matches_the_table(df, q):
    assert S.t_quantile(0.975, df) == pytest.approx(q, rel=1e-8)


def test_mean_ci_and_the_paired_difference_against_numpy_in_float64():
    rng = np.random.default_rng(18)
    for _ in range(50):
        n = int(rng.integers(2, 9))
        x = rng.normal(0.5, 0.2, n)
        m, half, k = S.mean_ci(x)
        assert k == n and m == pytest.approx(x.mean(), abs=1e-12)
        assert half == pytest.approx(S.t_quantile(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n), rel=1e-12)
        a = pd.DataFrame({"seed": range(n), "v": x})
        b = pd.DataFrame({"seed": range(n)[::-1], "v": x[::-1] - 0.1})  # same seeds, another order
        d = S.paired(a, b, "v", "v")
        assert np.allclose(d.sort_index().to_numpy(), 0.1, atol=1e-12)
    m, ci, n = S.mean_ci([0.3, float("nan"), None, 0.5])
    assert n == 2 and m == pytest.approx(0.4)


def test_texts_of_numbers():
    v = pd.Series([0.85, 0.86, 0.87], name="final/val/acc")
    m, lo, hi, n = S.interval(v)
    assert S.acc_text(v) == f"{m:.3f} [{lo:.3f}, {hi:.3f}] (n=3)" and 0 < lo < m < hi < 1
    assert S.acc_text([0.9]) == "0.900 (n=1)" and S.acc_text([]) == "n/a"
    assert S.diff_text([0.1, 0.2, 0.3]).startswith("+0.200 [") and S.diff_text([0.1, 0.2, 0.3]).endswith("(n=3)")
    assert S.stat(pd.Series([1.0, 2.0, 3.0], name="final/train/loss")).startswith("2.000 ± ")
    assert S.stat(v) == S.acc_text(v)  # an accuracy: the logit interval


def test_accuracy_intervals_stay_inside_0_1():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 6))
        v = np.clip(rng.uniform(0.0, 1.0) + rng.normal(0, 0.3, n), 0, 1)
        lo, hi = S.acc_interval(v)
        assert 0 <= lo <= hi <= 1
    v = [0.5, 0.97, 0.99]
    m, ci, _ = S.mean_ci(v)
    assert m + ci > 1 and S.acc_interval(v)[1] < 1  # the raw t-interval would pass 1
    agg = S.aggregate(pd.DataFrame({"g": [1, 1, 1], "final/val/acc": v}), ["g"], "final/val/acc")
    assert agg["bounded"].all() and agg["hi"].iloc[0] < 1


def test_frames_missing_values_groups_and_usable_runs():
    col = pd.Series(pd.array([4, pd.NA, 4], dtype="Int64"))
    assert fr.same(col, 4).tolist() == [True, False, True]
    assert fr.same(col, pd.NA).tolist() == [False, True, False] == fr.same(col, None).tolist()
    assert fr.same(pd.Series([0.1, float("nan")]), float("nan")).tolist() == [False, True]
    runs = pd.DataFrame({"run_id": list("abcd"), "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED"],
                         "diverged": [False, True, False, False], "seed": [0, 1, 0, 1],
                         "data.eval_batch_size": [2000, 512, 2000, 2000], "bn.shadow_momenta": [[0.1], [], [], []],
                         "bn.momentum": [0.1, 0.1, 0.01, 0.1]})
    ok, left, n_div = fr.split_runs(runs)
    assert list(ok["run_id"]) == ["a", "d"] and left == {"FAILED": 1} and n_div == 1
    assert fr.varying(runs) == ["bn.momentum"]  # seed, execution and extra fields never split a group
    assert fr.group_label({"bn.momentum": float("nan")}, ["bn.momentum"]) == "momentum None (cumulative)"


def test_plot_band_seed_lines_and_finish():
    fig, axes = P.new_figure()
    ax = axes[0, 0]
    P.band(ax, [1, 2, 3], [0.5, 0.6, 0.7], (np.array([0.4, 0.5, 0.6]), np.array([0.6, 0.7, 0.8])), "mean", "tab:blue")
    frame = pd.DataFrame({"seed": [0, 0, 1, 1], "x": [1, 2, 1, 2], "y": [0.5, 0.6, 0.55, 0.65]})
    P.seed_lines(ax, frame, "x", "y", "tab:blue")
    P.chance_line(ax)
    P.finish(fig, "A title", ["a note"])
    assert fig.get_suptitle() == "A title" and len(ax.collections) == 1  # the band
    assert sum(ln.get_label() == "_seed" for ln in ax.get_lines()) == 2
    assert fig._supxlabel.get_text() == "a note"


def test_default_figure_has_a_panel_per_varying_key():
    rows = [{"run_id": f"{u}{s}", "status": "FINISHED", "diverged": False, "seed": s, "bn.update_stats": u,
             "bn.momentum": m, "final/val/acc": 0.5 + 0.1 * s, "final/train/acc": 0.6}
            for s in range(2) for u in (True, False) for m in (0.1, 0.01)]
    fig = P.fig_final_by_key(pd.DataFrame(rows))
    assert [ax.get_xlabel() for ax in fig.axes] == ["bn.update_stats", "bn.momentum"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["0.01", "0.1"]

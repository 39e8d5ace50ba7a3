"""Error rates and rounds to a decision of bnlab's verdicts under optional stopping. Not a test: run it
and read the table (the CI test, tests/test_verdicts_sequential.py, asserts the Gaussian case).

    python benchmarks/sim_verdicts.py [--studies 20000] [--max-seeds 20] [--per-round 2]

Every simulated study adds --per-round seeds per round, reads 'the mean is above 0' after every
round (bnlab.analysis.verdicts' own interval code) and stops at the first decision. With true mean 0
it prints the rate of false 'holds' and of any decision, for the anytime-valid confidence sequence
and the fixed-n t-interval, for Gaussian per-seed values and for heavy-tailed and skewed ones (the
sequence assumes Gaussian values, as the t-interval does); with a true effect, the share decided and
the median rounds it took.
"""
from __future__ import annotations

import argparse

import numpy as np

from bnlab.analysis import verdicts as V


def studies(x: np.ndarray, per_round: int, method: str):
    n_studies, max_seeds = x.shape
    verdict = np.full(n_studies, V.UNDECIDED, dtype=object)
    stopped = np.full(n_studies, max_seeds)
    for n in range(per_round, max_seeds + 1, per_round):
        _, lo, hi = V.bounds(x[:, :n], 0.05, method)
        now = np.asarray(V.read_above(lo, hi, 0.0), dtype=object)
        first = (verdict == V.UNDECIDED) & (now != V.UNDECIDED)
        verdict[first], stopped[first] = now[first], n
    return verdict, stopped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20000)
    ap.add_argument("--max-seeds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = (a.studies, a.max_seeds)
    nulls = {"Gaussian": lambda: rng.standard_normal(shape),
             "Student t, 3 df": lambda: rng.standard_t(3, shape),
             "exponential - 1 (right skew)": lambda: rng.exponential(1.0, shape) - 1.0,
             "1 - exponential (left skew: rare bad seeds)": lambda: 1.0 - rng.exponential(1.0, shape)}
    print(f"{a.studies} studies, up to {a.max_seeds} seeds in rounds of {a.per_round}, stop at the first decision")
    print(f"CS: {V.CS_METHOD}\n")
    print("| true mean 0, per-seed values | method | false holds | any decision |")
    print("|---|---|---|---|")
    for name, draw in nulls.items():
        x = draw()
        for method in (V.SEQUENTIAL, V.FIXED):
            v, _ = studies(x, a.per_round, method)
            print(f"| {name} | {method} | {(v == V.HOLDS).mean():.4f} | {(v != V.UNDECIDED).mean():.4f} |")
    print("\n| true effect (SDs), Gaussian | decided 'holds' | median rounds | 90th percentile rounds | refuted |")
    print("|---|---|---|---|---|")
    for effect in (0.5, 1.0, 1.5, 2.0, 3.0):
        v, n = studies(rng.standard_normal(shape) + effect, a.per_round, V.SEQUENTIAL)
        h = v == V.HOLDS
        r = n[h] // a.per_round
        print(f"| {effect:g} | {h.mean():.3f} | {np.median(r):g} | {np.percentile(r, 90):g} | "
              f"{(v == V.REFUTED).mean():.4f} |")


if __name__ == "__main__":
    main()

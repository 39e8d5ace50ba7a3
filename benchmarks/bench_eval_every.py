"""The cost of step-level evaluation (train.eval_every). Not a test: run it and read the ratios.

    python benchmarks/bench_eval_every.py [--rounds N] [--train N] [--every 25,100] [--subset 2000]

One process, real Fashion-MNIST (a fixed training subset of --train examples, batch 256, LeNet-BN,
precise BN on 4096 samples, 4 shadow momenta as in the ema_vs_precise study). Each round times one
epoch of train_epoch plus its per-epoch evaluation (what train() runs) for eval_every = 0 (only
the per-epoch evaluation) and for each value of --every (with the step-level evaluation on a fixed
--subset validation subset), interleaved with a rotating start; the ratio to eval_every=0 is the
median of the per-round ratios (the machine is shared: only ratios from one round compare).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from bnlab import train as T
from bnlab.config import BNConfig, Config, DataConfig, TrainConfig


def build(train_n: int, every: int, subset: int) -> tuple:
    cfg = Config(data=DataConfig(train_subset=train_n),
                 bn=BNConfig(precise_samples=4096, shadow_momenta=[0.003, 0.01, 0.03, 0.3]),
                 train=TrainConfig(epochs=1, threads=torch.get_num_threads(), bs1_samples=0, progress=False,
                                   eval_every=every, eval_subset=subset))
    cfg.__post_init__()
    s = T.setup(cfg)
    val = T.eval_subset(s.ds, subset, 0)
    calls = []

    def on_eval(step: int) -> None:
        calls.append(T.step_metrics(s, cfg, val))

    return cfg, s, on_eval, calls


def one_epoch(cfg, s, on_eval) -> float:
    t0 = time.perf_counter()
    T.train_epoch(s, cfg.data.batch_size, eval_every=cfg.train.eval_every, on_eval=on_eval)
    T.epoch_metrics(s.model, s.ds, cfg, s.gen, final=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train", type=int, default=20480)
    ap.add_argument("--every", default="25,100")
    ap.add_argument("--subset", type=int, default=2000)
    a = ap.parse_args()
    everys = [0] + [int(x) for x in a.every.split(",")]
    variants = {e: build(a.train, e, a.subset) for e in everys}
    for e, (cfg, s, on_eval, _) in variants.items():  # untimed warm-up epoch
        one_epoch(cfg, s, on_eval)
    times = {e: [] for e in everys}
    for r in range(a.rounds):
        order = everys[r % len(everys):] + everys[:r % len(everys)]
        for e in order:
            cfg, s, on_eval, calls = variants[e]
            n0 = len(calls)
            times[e].append((one_epoch(cfg, s, on_eval), len(calls) - n0))
    steps = a.train // 256
    print(f"bench_eval_every: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.train} training examples ({steps} steps) per epoch, "
          f"step-level subset {a.subset}, {a.rounds} rounds")
    print(f"{'eval_every':>10} {'evals/epoch':>11} {'epoch s (median)':>17} {'ratio vs 0':>11} {'s per eval':>11}")
    base = [t for t, _ in times[0]]
    for e in everys:
        ts = [t for t, _ in times[e]]
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        n_eval = times[e][0][1]
        per = statistics.median((t - b) / n_eval for t, b in zip(ts, base)) if n_eval else float("nan")
        print(f"{e:>10} {n_eval:>11} {statistics.median(ts):>17.2f} {ratio:>11.2f} {per:>11.3f}")


if __name__ == "__main__":
    main()

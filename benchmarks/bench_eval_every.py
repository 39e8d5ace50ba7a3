"""The cost of step-level evaluation (train.eval_every). Not a test: run it and read the ratios.

    python benchmarks/bench_eval_every.py [--blocks N] [--every 10,25,50,100] [--subset 2000]

One process, real Fashion-MNIST, LeNet-BN, batch 256, precise BN on 4096 samples and 4 shadow
momenta (the ema_vs_precise study's settings). It alternates blocks of 10 SGD steps (train_epoch's
step, timed one by one) with one step-level evaluation (train.step_metrics on a fixed --subset
validation subset, timed), --blocks times, and reports the medians: on a shared machine whole
epochs timed minutes apart do not compare, while medians of interleaved short samples do. The
cost of eval_every = N is then (N x step + eval) / (N x step), printed for each N of --every.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from bnlab import train as T
from bnlab.config import BNConfig, Config, DataConfig, TrainConfig
from bnlab.data import train_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--every", default="10,25,50,100,234")
    ap.add_argument("--subset", type=int, default=2000)
    a = ap.parse_args()
    cfg = Config(data=DataConfig(train_subset=20480),
                 bn=BNConfig(precise_samples=4096, shadow_momenta=[0.003, 0.01, 0.03, 0.3]),
                 train=TrainConfig(epochs=1, bs1_samples=0, progress=False, eval_every=10, eval_subset=a.subset))
    cfg.__post_init__()
    s = T.setup(cfg)
    val = T.eval_subset(s.ds, a.subset, 0)
    batches = iter(())
    steps, evals = [], []

    def step() -> float:
        nonlocal batches
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(train_batches(s.ds.x_train, s.ds.y_train, 256, s.gen))
            xb, yb = next(batches)
        t0 = time.perf_counter()
        s.step(xb, yb)
        return time.perf_counter() - t0

    for _ in range(10):  # warm-up
        step()
    T.step_metrics(s, cfg, val)
    s.model.train()
    for _ in range(a.blocks):
        steps += [step() for _ in range(10)]
        t0 = time.perf_counter()
        T.step_metrics(s, cfg, val)
        evals.append(time.perf_counter() - t0)
        s.model.train()
    t_step, t_eval = statistics.median(steps), statistics.median(evals)
    print(f"bench_eval_every: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(steps)} SGD steps and {len(evals)} step-level evaluations "
          f"interleaved (subset {a.subset}, precise BN 4096 samples, 4 shadows)")
    print(f"median SGD step {t_step * 1e3:.1f} ms (batch 256); median step-level evaluation {t_eval * 1e3:.0f} ms "
          f"(= {t_eval / t_step:.1f} steps)")
    print(f"{'eval_every':>10} {'training-loop time vs eval_every=0':>36}")
    for n in (int(x) for x in a.every.split(",")):
        print(f"{n:>10} {(n * t_step + t_eval) / (n * t_step):>36.2f}")


if __name__ == "__main__":
    main()

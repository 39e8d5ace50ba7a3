"""Is train.compile=true another computation, or float32 rounding amplified by lr 1.0? Not a test: run
it and read the table (the evidence behind tests/test_train_paths.py::test_compiled_step_is_the_eager_maths).

    python benchmarks/compile_rounding.py [--steps 16]

The same seeded LeNet-ReLU (synthetic data, batch 32, SGD lr 1.0) takes --steps steps through
bnlab.train.TrainStep five ways: eager and compiled in float32, eager and compiled in float64, and
eager float32 with every weight first moved by one ulp (what rounding alone does to the trajectory).
It prints, after each step, the largest |difference| over the parameters and BN buffers and how many
elements fall outside rtol 1e-3 + atol 1e-5. Compiled and eager float64 agreeing to ~1e-14 while the
one-ulp run drifts as far as compiled32 does means: the same maths, different rounding.
"""
from __future__ import annotations

import argparse

import torch

from bnlab import train as T
from bnlab.config import Activation, BNConfig, Config, DataConfig, DataName, ModelConfig, TrainConfig


def run(compile: bool, dtype: torch.dtype, steps: int, ulp: bool = False):
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=512, synthetic_val=128, batch_size=32),
                 bn=BNConfig(precise_samples=256), model=ModelConfig(activation=Activation.relu),
                 train=TrainConfig(epochs=1, threads=1, bs1_samples=0, compile=compile))
    cfg.__post_init__()
    s = T.setup(cfg)
    s.model.to(dtype)
    if ulp:
        with torch.no_grad():
            for p in s.model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    out = []
    for xb, yb in zip(s.ds.x_train[:32 * steps].to(dtype).split(32), s.ds.y_train[:32 * steps].split(32)):
        s.step(xb, yb)
        out.append({k: v.detach().double().clone() for k, v in s.model.state_dict().items()})
    return out


def dist(a, b) -> str:
    d = max((a[k] - b[k]).abs().max().item() for k in a)
    n = sum(int(((a[k] - b[k]).abs() > 1e-5 + 1e-3 * b[k].abs()).sum()) for k in a)
    return f"{d:9.2e} n={n:<6d}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    e32, c32 = run(False, torch.float32, a.steps), run(True, torch.float32, a.steps)
    e64, c64 = run(False, torch.float64, a.steps), run(True, torch.float64, a.steps)
    u32 = run(False, torch.float32, a.steps, ulp=True)
    print(f"torch {torch.__version__}; max |difference| after each step at lr 1.0 "
          "(n = elements outside rtol 1e-3 + atol 1e-5)")
    cols = ["compiled32-eager32", "eager32(+1ulp)-eager32", "eager32-eager64", "compiled32-eager64",
            "compiled64-eager64"]
    print("step | " + " | ".join(f"{c:<18}" for c in cols))
    for i in range(a.steps):
        print(f"{i + 1:4d} | " + " | ".join(dist(x[i], y[i]) for x, y in
                                           ((c32, e32), (u32, e32), (e32, e64), (c32, e64), (c64, e64))))


if __name__ == "__main__":
    main()

"""ResNet-20 training throughput (issue 12): bnlab's loop against the plain PyTorch loop. Not a test:
run it and read the ratios.

    python benchmarks/bench_resnet.py [--rounds N] [--examples N] [--batch N] [--device cpu|cuda]
                                      [--compile] [--threads N] [--json PATH]

plain   the same ResNet-20 (bnlab.models.resnet20 with every BN converted to torch.nn.BatchNorm2d
        by bnlab.convert_bn(to="torch")), a DataLoader(TensorDataset, shuffle=True), SGD lr 0.1,
        momentum 0.9, weight decay 1e-4 (He et al. 2016), loss.item() every step.
bnlab   bnlab.train.setup + train_epoch (the code `bnlab-train model=resnet20` runs) with the same
        optimiser, bnlab's BatchNorm2d; optionally train.compile=true, and bn.shadow_momenta of
        length 4 (the momentum axis from one run).
Examples are CIFAR-shaped (3x32x32) synthetic images: speed does not depend on their content.
Variants are interleaved round by round (starting variant rotated), each after one untimed warm-up
epoch; the figures are medians of per-round ratios to the plain loop (see bench_train.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _torch, interleave, machine, table, warmed  # noqa: E402

PLAIN = "plain PyTorch (DataLoader, loss.item())"


def config(n: int, batch: int, device: str, **opts):
    from bnlab.config import Config, DataConfig, DataName, Device, ModelConfig, ModelName, OptimConfig

    cfg = Config(model=ModelConfig(name=ModelName.resnet20),
                 data=DataConfig(name=DataName.synthetic, synthetic_train=n, synthetic_val=batch, batch_size=batch),
                 optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4))
    cfg.train.progress = False
    cfg.train.device = Device(device)
    cfg.train.compile = opts.get("compile", False)
    cfg.bn.shadow_momenta = list(opts.get("shadow_momenta", []))
    return cfg


def plain_runner(ds, batch: int, device: str) -> Callable[[], float]:
    torch = _torch()
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import bnlab
    from bnlab.config import BNConfig, ModelConfig, ModelName
    from bnlab.models import build_model

    torch.manual_seed(0)
    model = bnlab.convert_bn(build_model(ModelConfig(name=ModelName.resnet20), BNConfig(), ds.shape), to="torch")
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=batch, shuffle=True, drop_last=True)

    def epoch() -> float:
        model.train()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        n = 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            n += len(yb)
        return n / (time.perf_counter() - t0)

    return warmed(epoch)


def bnlab_runner(ds, batch: int, device: str, **opts) -> Callable[[], float]:
    _torch()
    from bnlab.train import setup, train_epoch

    cfg = config(len(ds.x_train), batch, device, **opts)
    s = setup(cfg, data=ds)

    def epoch() -> float:
        return train_epoch(s, batch)["perf/train_examples_per_s"]

    return warmed(epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=1024, help="training examples per timed epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="add bnlab with train.compile=true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch = _torch()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: skipped")
        return
    from bnlab.data import make_synthetic

    ds = make_synthetic(a.examples, a.batch, shape=(3, 32, 32))
    print(f"machine: {machine()}")
    print(f"== ResNet-20 training throughput on {a.device}: batch {a.batch}, epochs of {a.examples:,} "
          f"3x32x32 examples, training only (examples/s)")
    build = {PLAIN: lambda: plain_runner(ds, a.batch, a.device),
             "bnlab (bnlab-train model=resnet20)": lambda: bnlab_runner(ds, a.batch, a.device),
             "bnlab, bn.shadow_momenta of length 4": lambda: bnlab_runner(
                 ds, a.batch, a.device, shadow_momenta=[0.001, 0.01, 0.03, 0.3])}
    if a.compile:
        build["bnlab, train.compile=true"] = lambda: bnlab_runner(ds, a.batch, a.device, compile=True)
    variants = {}
    for k, f in build.items():
        t0 = time.perf_counter()
        variants[k] = f()
        print(f"  warm-up epoch of {k}: {time.perf_counter() - t0:.1f} s", flush=True)
    vals = interleave(variants, a.rounds)
    rows = table(vals, PLAIN, "ex/s")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "device": a.device, "batch": a.batch,
                                            "examples": a.examples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

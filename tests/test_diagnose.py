"""diagnose: stale statistics flagged on a model trained with bn.update_stats=false (and on a plain
torch model whose BN never moved), a healthy verdict on one trained normally, the model untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnlab
from bnlab import evaluation
from bnlab import train as train_mod
from bnlab.config import BNConfig, Config, DataConfig, DataName, Device, TrainConfig
from bnlab.data import eval_batches, make_synthetic, train_batches


def _trained_lenet(update_stats: bool):
    """LeNet-BN (d2l 7.5) trained 2 epochs on 1024 synthetic examples through bnlab's own loop."""
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=1024, synthetic_val=256, batch_size=32),
                 bn=BNConfig(update_stats=update_stats),
                 train=TrainConfig(epochs=2, progress=False, device=Device.cpu))
    s = train_mod.setup(cfg)
    for _ in range(cfg.train.epochs):
        m = train_mod.train_epoch(s, cfg.data.batch_size)
    assert m["train/acc"] > 0.9, "the synthetic set is learnt in two epochs"
    return s


def _diagnose(s):
    gen = torch.Generator().manual_seed(5)
    return bnlab.diagnose(s.model, train_batches(s.ds.x_train, s.ds.y_train, 32, gen),
                          eval_batches(s.ds.x_val, s.ds.y_val, 32), num_samples=1000)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_update_stats_false_is_stale_and_normal_training_is_healthy():
    stale, healthy = _trained_lenet(False), _trained_lenet(True)
    for s in (stale, healthy):
        s.model.train()
        before = _state(s.model)
        d = _diagnose(s)
        after = s.model.state_dict()
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), f"diagnose changed {k}"
        assert all(m.training for m in s.model.modules()), "train mode restored"
        assert all(m.eval_stats == "running" for m in bnlab.bn.bn_modules(s.model))
        assert list(d.layers["layer"]) == ["1", "5", "10", "13"] and d.num_samples == 1000
        assert set(d.evals.index) == {"running", "batch", "precise"}
        assert "verdict: " + d.verdict in str(d)
        s.d = d
    d = stale.d
    acc = d.evals["acc"]
    assert acc["precise"] - acc["running"] > 0.3, acc
    assert (d.layers["batches_tracked"] == 0).all() and not d.layers["update_stats"].any()
    assert (d.layers["mean_err"] > 0.9).all(), "running mean still 0: distance 1 from the population mean"
    assert d.verdict.startswith("running statistics are stale; precise BN recovers")
    assert "4 of 4 BN layers never updated" in d.verdict
    gain = 100 * (acc["precise"] - acc["running"])
    assert f"recovers {gain:.1f} points" in d.verdict

    # The per-layer distances are those of bn.running_stats_error against precise BN on the same batches,
    # and the precise row is the precise-BN model's evaluation.
    for s in (stale, healthy):
        ref = bnlab.bn.precise_bn(s.model, train_batches(s.ds.x_train, s.ds.y_train, 32, torch.Generator().manual_seed(5)),
                                  1000)
        err = bnlab.bn.running_stats_error(s.model, ref)
        assert s.d.layers["mean_err"].mean() == pytest.approx(err["mean_err"], rel=1e-12)
        assert s.d.layers["var_err"].mean() == pytest.approx(err["var_err"], rel=1e-12)
        ev = evaluation.evaluate(ref, s.ds.x_val, s.ds.y_val, 32)
        assert s.d.evals.loc["precise", "acc"] == pytest.approx(ev["acc"])
        assert s.d.evals.loc["precise", "loss"] == pytest.approx(ev["loss"], rel=1e-5)

    h = healthy.d
    assert abs(h.evals["acc"]["precise"] - h.evals["acc"]["running"]) < 0.02
    assert (h.layers["mean_err"] < 0.3).all() and (h.layers["batches_tracked"] == 64).all()
    assert h.verdict.startswith("healthy: running statistics are within")


class PlainNet(nn.Module):
    """A network bnlab has never seen: torch BN only, trained with a plain PyTorch loop."""

    def __init__(self, momentum):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 16),
                               nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.f(x)


def _plain_trained(momentum):
    ds = make_synthetic(1024, 256, shape=(3, 16, 16))
    # Shift the inputs so the initial running mean 0 / variance 1 are far from the truth.
    x_train, x_val = ds.x_train * 4 + 3, ds.x_val * 4 + 3
    torch.manual_seed(0)
    model = PlainNet(momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(x_train, ds.y_train), batch_size=32, shuffle=True, drop_last=True)
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, loader, DataLoader(TensorDataset(x_val, ds.y_val), batch_size=64)


@pytest.mark.parametrize("momentum, stale", [(0.0, True), (0.1, False)])
def test_plain_torch_model_with_a_dataloader(momentum, stale):
    model, train_loader, val_loader = _plain_trained(momentum)
    model.eval()
    before = _state(model)
    d = bnlab.diagnose(model, train_loader, val_loader, num_samples=512)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training
    assert list(d.layers["kind"]) == ["BatchNorm2d", "BatchNorm1d"]
    if stale:
        assert "running statistics are stale" in d.verdict and "raise the momentum" in d.verdict
        assert d.evals["acc"]["precise"] - d.evals["acc"]["running"] > 0.2
    else:
        assert d.verdict.startswith("healthy"), d.verdict


def test_no_bn_is_refused():
    with pytest.raises(ValueError, match="at least one BatchNorm"):
        bnlab.diagnose(nn.Linear(3, 2), [torch.randn(4, 3)], [(torch.randn(4, 3), torch.zeros(4).long())])

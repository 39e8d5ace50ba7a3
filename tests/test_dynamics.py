"""Step-level evaluation, learning-rate schedules, FrozenBN and ghost batch BN in the training
loop: each checked against what it must equal (a plain run, a closed form, a float64 reference)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnlab import bn as bnm
from bnlab import train as train_mod
from bnlab.config import (BNConfig, Config, ConfigError, DataConfig, DataName, OptimConfig, Schedule,
                          TrainConfig)
from bnlab.schedule import lr_at


class ListTracker:
    """Records every log call: (step, metrics)."""

    def __init__(self):
        self.logged = []

    def start(self, params, tags, config_text):
        pass

    def log_epoch(self, step, metrics):
        self.logged.append((step, dict(metrics)))

    def set_tags(self, tags):
        pass

    def end(self, status, error=None):
        self.status = status

    def flush(self):
        pass

    def where(self):
        return "memory"


def small(epochs=2, batch_size=32, bn=None, optim=None, **train_kw) -> Config:
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=512, synthetic_val=128, batch_size=batch_size),
                 bn=bn or BNConfig(precise_samples=256), optim=optim or OptimConfig(lr=0.5),
                 train=TrainConfig(epochs=epochs, threads=1, bs1_samples=0, progress=False, **train_kw))
    cfg.__post_init__()
    return cfg


# ----------------------------------------------------------------------------- step-level evaluation

def test_step_metrics_land_at_the_global_steps_and_do_not_change_training():
    # 512 examples / 32 = 16 steps per epoch, 2 epochs: evaluations after steps 5, 10, ..., 30.
    cfg = small(eval_every=5, eval_subset=50, bn=BNConfig(precise_samples=256, shadow_momenta=[0.01]))
    t = ListTracker()
    out = train_mod.train(cfg, t)
    step_logs = [(s, m) for s, m in t.logged if any(k.startswith("step/") for k in m)]
    epoch_logs = [(s, m) for s, m in t.logged if not any(k.startswith("step/") for k in m)]
    assert [s for s, _ in step_logs] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in epoch_logs] == [1, 2]  # epoch metrics keep step = epoch, no prefix
    for _, m in step_logs:
        for k in ("step/val/acc", "step/val/acc_batch_stats", "step/val/acc_precise_bn",
                  "step/val/acc_shadow/0.01", "step/lr"):
            assert k in m, k
        # accuracies on the 50-example subset are multiples of 1/50
        assert abs(m["step/val/acc"] * 50 - round(m["step/val/acc"] * 50)) < 1e-9
    # the same run without step-level evaluation trains identically (own generator for precise BN)
    plain = train_mod.train(small(bn=BNConfig(precise_samples=256, shadow_momenta=[0.01])))
    assert plain["train/loss"] == out["train/loss"] and plain["val/acc"] == out["val/acc"]


def test_step_eval_with_the_whole_set_matches_the_epoch_eval_at_the_epoch_boundary():
    cfg = small(eval_every=16)  # 16 steps per epoch: the evaluation runs at each epoch's end
    t = ListTracker()
    train_mod.train(cfg, t)
    epochs = {s: m for s, m in t.logged if "val/acc" in m}
    steps = {s: m for s, m in t.logged if "step/val/acc" in m}
    assert epochs[1]["val/acc"] == steps[16]["step/val/acc"]
    assert epochs[2]["val/acc_batch_stats"] == steps[32]["step/val/acc_batch_stats"]


def test_eval_subset_is_fixed_and_of_the_requested_size():
    from bnlab.data import load_data

    ds = load_data(small().data)
    a, ya = train_mod.eval_subset(ds, 40, 0)
    b, yb = train_mod.eval_subset(ds, 40, 0)
    assert len(a) == 40 and torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(train_mod.eval_subset(ds, 40, 1)[0], a)
    assert train_mod.eval_subset(ds, None, 0)[0] is ds.x_val


# ----------------------------------------------------------------------------- schedules

def test_schedules_give_the_documented_rate():
    spe, E = 10, 6
    const = OptimConfig(lr=0.4)
    assert [lr_at(const, i, spe, E) for i in (0, 17, 59)] == [0.4, 0.4, 0.4]
    step = OptimConfig(lr=1.0, schedule=Schedule.step, milestones=[2, 4], gamma=0.1)
    assert lr_at(step, 19, spe, E) == 1.0  # last step of epoch 2
    assert lr_at(step, 20, spe, E) == pytest.approx(0.1)  # first step of epoch 3
    assert lr_at(step, 39, spe, E) == pytest.approx(0.1)
    assert lr_at(step, 40, spe, E) == pytest.approx(0.01)
    cos = OptimConfig(lr=2.0, schedule=Schedule.cosine)
    assert lr_at(cos, 0, spe, E) == 2.0
    assert lr_at(cos, 30, spe, E) == pytest.approx(1.0)  # half way: cos(pi/2) = 0
    assert lr_at(cos, 45, spe, E) == pytest.approx(1.0 * (1 + math.cos(math.pi * 0.75)))
    warm = OptimConfig(lr=1.0, schedule=Schedule.cosine, warmup_epochs=1)
    assert [lr_at(warm, i, spe, E) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(warm, 10, spe, E) == 1.0  # cosine starts at the end of the warm-up
    assert lr_at(warm, 35, spe, E) == pytest.approx(0.5)  # (35/10 - 1) / (6 - 1) = 1/2


def test_the_optimizer_uses_the_scheduled_rate_and_it_is_logged():
    cfg = small(epochs=3, eval_every=8, optim=OptimConfig(lr=0.5, schedule=Schedule.step, milestones=[1, 2], gamma=0.5))
    t = ListTracker()
    train_mod.train(cfg, t)
    lrs = {s: m["step/lr"] for s, m in t.logged if "step/lr" in m}
    # step 8 used lr 0.5 (epoch 1), step 24 the 8th step of epoch 2: 0.25, step 48: 0.125
    assert lrs[8] == 0.5 and lrs[24] == 0.25 and lrs[48] == 0.125
    assert [m["train/lr"] for s, m in t.logged if "train/lr" in m] == [0.5, 0.25, 0.125]


def test_schedule_fields_are_checked():
    for kw, field in ((dict(gamma=0.0), "optim.gamma"), (dict(milestones=[3, 2]), "optim.milestones"),
                      (dict(warmup_epochs=-1.0), "optim.warmup_epochs")):
        with pytest.raises(ConfigError, match=field):
            OptimConfig(**kw)
    with pytest.raises(ConfigError, match="optim.milestones"):
        small(epochs=2, optim=OptimConfig(schedule=Schedule.step, milestones=[2]))
    with pytest.raises(ConfigError, match="bn.ghost_batch_size"):
        small(batch_size=32, bn=BNConfig(ghost_batch_size=5))
    with pytest.raises(ConfigError, match="bn.freeze_at"):
        small(epochs=2, bn=BNConfig(freeze_at=3))
    with pytest.raises(ConfigError, match="train.eval_every"):
        TrainConfig(eval_every=-1)


# ----------------------------------------------------------------------------- FrozenBN

def test_frozen_bn_stops_the_running_statistics_and_uses_the_precise_ones_in_training():
    torch.manual_seed(0)
    m = bnm.BatchNorm2d(3, momentum=0.1).double()
    data = [torch.randn(16, 3, 4, 4, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    m.train()
    m(torch.randn(16, 3, 4, 4, dtype=torch.float64))  # some running statistics
    bnm.freeze(m, data, 64)
    allx = torch.cat(data)
    mean = allx.mean((0, 2, 3))
    var = allx.var((0, 2, 3), unbiased=True)
    assert torch.allclose(m.running_mean, mean) and torch.allclose(m.running_var, var)
    assert m.training and bnm.is_frozen(m)
    before = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = m(x)  # training mode, frozen: population statistics, not the batch's
    ref = F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
    assert torch.allclose(y, ref)
    assert not torch.allclose(y, F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gr)
    for a, b in zip(before, (m.running_mean, m.running_var, m.num_batches_tracked)):
        assert torch.equal(a, b)
    bnm.unfreeze(m)
    m(x.detach())
    assert not torch.equal(before[0], m.running_mean)


def test_freeze_at_in_a_run_keeps_the_running_statistics_fixed():
    cfg = small(epochs=3, bn=BNConfig(precise_samples=256, freeze_at=2))
    out = train_mod.train(cfg, ListTracker())
    plain = train_mod.train(small(epochs=3))
    assert math.isfinite(out["train/loss"]) and out["train/loss"] != plain["train/loss"]
    # the loop by hand, as train() runs it: no buffer moves during a frozen epoch
    s = train_mod.setup(cfg)
    train_mod.train_epoch(s, 32)
    bnm.freeze(s.model, train_mod.precise_source(s.ds, 32, s.gen), 256)
    snap = [b.clone() for b in s.model.buffers()]
    train_mod.train_epoch(s, 32)
    assert all(torch.equal(a, b) for a, b in zip(snap, s.model.buffers()))


# ----------------------------------------------------------------------------- ghost batch BN

@pytest.mark.parametrize("shape,g", [((24, 5), 4), ((24, 3, 5, 5), 8), ((22, 4), 4), ((13, 4), 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_equals_batch_norm_applied_chunk_by_chunk(shape, g, momentum):
    """Outputs, gradients (input, gamma, beta) and running statistics in float64 against
    torch.nn.functional.batch_norm applied to each ghost batch in turn (a last chunk of one
    dense example is joined to the previous one: (13, 4) with g=4 gives 4, 4, 5)."""
    torch.manual_seed(1)
    cls = bnm.BatchNorm1d if len(shape) == 2 else bnm.BatchNorm2d
    c = shape[1]
    m = cls(c, momentum=momentum, ghost_batch_size=g).double().train()
    with torch.no_grad():
        m.weight.copy_(torch.rand(c) + 0.5)
        m.bias.copy_(torch.randn(c))
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    y = m(x)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    outs, k = [], 0
    bounds = list(range(0, shape[0], g))
    if len(shape) == 2 and shape[0] - bounds[-1] == 1:
        bounds.pop()
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else shape[0]
        k += 1
        factor = 1.0 / k if momentum is None else momentum
        outs.append(F.batch_norm(x[start:end], rm, rv, w, b, True, factor, 1e-5))
    ref = torch.cat(outs)
    assert torch.allclose(y, ref, atol=1e-12)
    gout = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight, m.bias), gout)
    want = torch.autograd.grad(ref, (x, w, b), gout)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-10)
    assert torch.allclose(m.running_mean, rm, atol=1e-12) and torch.allclose(m.running_var, rv, atol=1e-12)
    assert int(m.num_batches_tracked) == len(bounds)
    # batch-statistics evaluation normalises per ghost batch too; running-statistics eval ignores g
    m.eval()
    with bnm.batch_stats_eval(m):
        yb = m(x.detach())
    assert torch.allclose(yb, ref.detach(), atol=1e-12)
    plain = cls(c).double().eval()
    plain.load_state_dict(m.state_dict())
    assert torch.allclose(m(x.detach()), plain(x.detach()))


def test_ghost_bn_with_shadows_updates_each_shadow_once_per_chunk():
    torch.manual_seed(2)
    m = bnm.BatchNorm1d(3, momentum=0.1, shadow_momenta=(0.5,), ghost_batch_size=4).double().train()
    x = torch.randn(12, 3, dtype=torch.float64)
    m(x)
    ref = bnm.BatchNorm1d(3, momentum=0.5).double().train()
    for chunk in x.split(4):
        ref(chunk)
    assert torch.allclose(m.shadow_mean[0], ref.running_mean) and torch.allclose(m.shadow_var[0], ref.running_var)


def test_a_ghost_run_differs_from_a_whole_batch_run_and_trains():
    a = train_mod.train(small(bn=BNConfig(precise_samples=256, ghost_batch_size=4)))
    b = train_mod.train(small())
    assert math.isfinite(a["train/loss"]) and a["train/loss"] != b["train/loss"]


# ----------------------------------------------------------------------------- precise sizes

def test_precise_sizes_are_logged_at_the_last_epoch_and_the_whole_set_equals_precise_bn():
    cfg = small(bn=BNConfig(precise_samples=512, precise_sizes=[16, 10**6]))
    t = ListTracker()
    train_mod.train(cfg, t)
    (s1, m1), (s2, m2) = t.logged
    assert not any(k.startswith("val/acc_precise_bn/") for k in m1)
    assert 0 <= m2["val/acc_precise_bn/16"] <= 1
    # all 512 training examples, in another order: the same population statistics
    assert m2["val/acc_precise_bn/1000000"] == pytest.approx(m2["val/acc_precise_bn"], abs=1 / 128 + 1e-12)

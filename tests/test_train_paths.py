"""The training loop's options (shadow momenta, compile, bf16 autocast) and the logging process:
each checked against the plain path it replaces."""
from __future__ import annotations

import pytest
import torch

from bnlab import train as train_mod
from bnlab.config import Activation, BNConfig, Config, DataConfig, DataName, ModelConfig, TrainConfig
from bnlab.tracking import BackgroundTracker, MlflowTracker, NullTracker

from conftest import runs_of, store_uri


def cfg_with(momentum=0.1, shadows=(), epochs=2, **train_kw) -> Config:
    cfg = Config(data=DataConfig(name=DataName.synthetic, synthetic_train=512, synthetic_val=128, batch_size=32),
                 bn=BNConfig(momentum=momentum, shadow_momenta=list(shadows), precise_samples=256),
                 train=TrainConfig(epochs=epochs, threads=1, bs1_samples=0, **train_kw))
    cfg.__post_init__()
    return cfg


def test_a_shadow_equals_a_separate_run_with_that_momentum():
    """Momentum does not change training, so one run's shadow statistics are what a separate run
    with that bn.momentum holds: its validation accuracy is the same number, exactly."""
    shadows = (0.0, 0.01, 0.5, 1.0)
    one = train_mod.train(cfg_with(momentum=0.1, shadows=shadows))
    for m in shadows:
        sep = train_mod.train(cfg_with(momentum=m))
        assert one[f"val/acc_shadow/{m:g}"] == sep["val/acc"], m
        # the training trajectory is the same run, bit for bit
        assert one["train/loss"] == sep["train/loss"] and one["train/acc"] == sep["train/acc"]
        # the statistics agree to float32 rounding (the shadow's batch variance comes from the
        # kernel's 1/sqrt(var + eps), the separate run's from the kernel's own update)
        for k in ("bnstats/mean_err", "bnstats/var_err"):
            assert one[f"{k}_shadow/{m:g}"] == pytest.approx(sep[k], rel=1e-4, abs=1e-6), (m, k)
    # and a different momentum does give different statistics (the check above can fail)
    assert one["bnstats/mean_err_shadow/0"] != pytest.approx(one["bnstats/mean_err_shadow/0.5"], rel=1e-3)


def test_momentum_zero_shadow_is_the_missing_update_ops_run():
    """The shadow with momentum 0 is never updated: the same statistics as bn.update_stats=false."""
    one = train_mod.train(cfg_with(shadows=(0.0,)))
    frozen = cfg_with()
    frozen.bn.update_stats = False
    sep = train_mod.train(frozen)
    assert one["val/acc_shadow/0"] == sep["val/acc"]
    assert one["bnstats/mean_err_shadow/0"] == pytest.approx(sep["bnstats/mean_err"], rel=1e-6)


def test_bf16_autocast_trains_with_bn_in_float32():
    cfg = cfg_with(amp=True)
    s = train_mod.setup(cfg)
    seen = []
    hook = lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype))  # noqa: E731
    bns = [m for m in s.model.modules() if type(m).__name__.startswith("BatchNorm")]
    assert bns
    handles = [m.register_forward_hook(hook) for m in bns]
    xb, yb = s.ds.x_train[:32], s.ds.y_train[:32]
    s.step(xb, yb)
    for h in handles:
        h.remove()
    # the conv/linear outputs reaching BN are bf16; BN's running statistics stay float32
    assert any(i == torch.bfloat16 for i, _ in seen), seen
    assert all(m.running_mean.dtype == torch.float32 for m in bns)
    out = train_mod.train(cfg)
    plain = train_mod.train(cfg_with())
    assert out["val/acc_batch_stats"] > 0.5 and abs(out["val/acc"] - plain["val/acc"]) < 0.15, (out, plain)


@pytest.mark.slow
def test_compiled_step_matches_eager_to_rounding():
    """train.compile=true (inductor; needs gcc on CPU): the same maths, different rounding."""
    cfg = cfg_with(epochs=1, compile=True)
    cfg.model = ModelConfig(activation=Activation.relu)
    eager_cfg = cfg_with(epochs=1)
    eager_cfg.model = ModelConfig(activation=Activation.relu)
    a, b = train_mod.setup(cfg), train_mod.setup(eager_cfg)
    for xb, yb in zip(a.ds.x_train[:96].split(32), a.ds.y_train[:96].split(32)):
        a.step(xb, yb)
        b.step(xb, yb)
    la, lb = a.step.sums()[0], b.step.sums()[0]
    assert la == pytest.approx(lb, rel=1e-4)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- the logging process

def test_logging_process_writes_every_epoch_in_order(home):
    bt = BackgroundTracker(MlflowTracker(store_uri(home), "unit", "via-process"), process=True)
    bt.start({"seed": 0}, {"bnlab.seed": "0"}, "seed: 0\n")
    import time

    deadline = time.time() + 60
    while not bt.in_process and time.time() < deadline:  # the process reports ready asynchronously
        bt._poll_ready()
        time.sleep(0.05)
    assert bt.in_process, "the logging process did not start"
    for step in range(1, 6):
        bt.log_epoch(step, {"train/loss": 1.0 / step, "val/acc": 0.1 * step})
    bt.set_tags({"bnlab.diverged": "false"})
    bt.end("FINISHED")
    c, runs = runs_of(home, "unit")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["bnlab.diverged"] == "false"
    hist = c.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5]
    assert [m.value for m in hist] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_a_failed_write_in_the_logging_process_fails_the_run(home):
    bt = BackgroundTracker(MlflowTracker(store_uri(home), "unit", "bad-write"), process=True)
    bt.start({}, {}, "")
    import time

    deadline = time.time() + 60
    while not bt.in_process and time.time() < deadline:
        bt._poll_ready()
        time.sleep(0.05)
    assert bt.in_process
    bt.log_epoch(1, {"val/acc": 0.5})
    bt.log_epoch(2, {"not a valid name!": 0.5})  # MLflow rejects '!' in a metric name
    bt.end("FINISHED")
    c, runs = runs_of(home, "unit")
    (run,) = runs
    assert run.info.status == "FAILED"
    assert "tracker call failed" in run.data.tags["bnlab.error"]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/acc")] == [1]


def test_null_tracker_never_spawns_a_process():
    bt = BackgroundTracker(NullTracker(), process=True)
    bt.start({}, {}, "")
    bt.log_epoch(1, {"a": 1.0})
    bt.end("FINISHED")
    assert not bt.in_process and bt._proc is None

"""Tests of bnlab.bn against torch.nn.BatchNorm and closed forms (float64, small random inputs)."""
from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import bn

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
IMPLS = ("native", "scratch")
# (input shape without batch dim, our class, torch class): dense, sequence and image inputs.
LAYOUTS = {
    "2d": ((4,), bn.BatchNorm1d, nn.BatchNorm1d),
    "3d": ((3, 5), bn.BatchNorm1d, nn.BatchNorm1d),
    "4d": ((3, 4, 2), bn.BatchNorm2d, nn.BatchNorm2d),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors: intra-op threads only add OpenMP start-up/contention cost (tens of ms per
    # batch_norm call on a busy 2-core machine). Restored for other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def batch(g, layout: str, n: int):
    return rand(g, n, *LAYOUTS[layout][0])


def pair(layout: str, g, *, impl="native", momentum=0.1, affine=True, **kw):
    """Our module and torch's, float64, with the same random non-trivial weight and bias."""
    shape, ours_cls, torch_cls = LAYOUTS[layout]
    c = shape[0]
    ours = ours_cls(c, momentum=momentum, affine=affine, impl=impl, **kw).to(DT)
    ref = torch_cls(c, momentum=momentum, affine=affine).to(DT)
    if affine:
        with torch.no_grad():
            w, b = 1 + 0.5 * rand(g, c), rand(g, c)
            ours.weight.copy_(w), ours.bias.copy_(b)
            ref.weight.copy_(w), ref.bias.copy_(b)
    return ours, ref


def make(layout: str, g, **kw):
    """One of our modules with random weight/bias (float64)."""
    shape, ours_cls, _ = LAYOUTS[layout]
    m = ours_cls(shape[0], **kw).to(DT)
    if m.affine:
        with torch.no_grad():
            m.weight.copy_(1 + 0.5 * rand(g, shape[0]))
            m.bias.copy_(rand(g, shape[0]))
    return m


def close(a, b, **tol):
    return torch.allclose(a, b, **(tol or TOL))


def stats_ref(x):
    """Per-channel mean and biased var computed independently (channels moved first, flattened)."""
    xc = x.transpose(0, 1).reshape(x.shape[1], -1)
    return xc.mean(1), xc.var(1, unbiased=False), xc.shape[1]


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats_and_normalize_closed_form(layout):
    g = gen(1)
    x = batch(g, layout, 6) * 3 + 2
    mean, var = bn.batch_stats(x)
    m_ref, v_ref, _ = stats_ref(x)
    assert mean.shape == var.shape == (x.shape[1],)
    assert close(mean, m_ref) and close(var, v_ref)
    gamma, beta = rand(g, x.shape[1]), rand(g, x.shape[1])
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = bn.normalize(x, mean, var, gamma, beta, 1e-3)
    expect = (x - m_ref.view(shape)) / torch.sqrt(v_ref.view(shape) + 1e-3) * gamma.view(shape) + beta.view(shape)
    assert close(y, expect)
    # gamma/beta None mean 1 and 0.
    assert close(bn.normalize(x, mean, var, None, None, 1e-3),
                 bn.normalize(x, mean, var, torch.ones_like(gamma), torch.zeros_like(beta), 1e-3))


def test_ema_update_is_pure_torch_convention():
    g = gen(2)
    running, value = rand(g, 5), rand(g, 5)
    before = running.clone()
    out = bn.ema_update(running, value, 0.25)
    assert close(out, 0.75 * before + 0.25 * value)
    assert torch.equal(running, before)
    assert torch.equal(bn.ema_update(running, value, 1.0), value)
    with pytest.raises(ValueError, match="momentum"):
        bn.ema_update(running, value, 1.5)


def test_decay_conversion_round_trip_and_range():
    for d in (0.0, 0.1, 0.9, 0.99, 0.999, 1.0):
        assert math.isclose(bn.decay_from_momentum(bn.momentum_from_decay(d)), d, abs_tol=1e-15)
        assert math.isclose(bn.momentum_from_decay(d), 1 - d)
    assert math.isclose(bn.momentum_from_decay(0.9), 0.1, rel_tol=1e-12)
    for bad in (1.5, -0.1, float("nan"), None, "0.9", True):
        with pytest.raises(ValueError, match="decay"):
            bn.momentum_from_decay(bad)
        with pytest.raises(ValueError, match="momentum"):
            bn.decay_from_momentum(bad)


def test_decay_09_module_matches_torch_momentum_01():
    g = gen(3)
    ours, ref = pair("2d", g, momentum=bn.momentum_from_decay(0.9))
    ref.momentum = 0.1
    for n in (5, 8, 3):
        x = batch(g, "2d", n)
        assert close(ours(x), ref(x))
    assert close(ours.running_mean, ref.running_mean) and close(ours.running_var, ref.running_var)
    assert not torch.equal(ours.running_var, torch.ones(4, dtype=DT))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_scratch_matches_functional(layout):
    g = gen(4)
    c = LAYOUTS[layout][0][0]
    x = batch(g, layout, 5).requires_grad_()
    gamma, beta = rand(g, c).requires_grad_(), rand(g, c).requires_grad_()
    rm, rv = rand(g, c), rand(g, c).exp()
    rm_t, rv_t = rm.clone(), rv.clone()
    # Training under no_grad: the mode is the flag, not grad mode (D2L 7.5's pitfall).
    with torch.no_grad():
        y0, _, _ = bn.batch_norm_scratch(x, gamma, beta, rm, rv, training=True, momentum=0.3, eps=1e-4)
    y, nm, nv = bn.batch_norm_scratch(x, gamma, beta, rm, rv, training=True, momentum=0.3, eps=1e-4)
    y_t = F.batch_norm(x, rm_t, rv_t, gamma, beta, True, 0.3, 1e-4)
    assert close(y0, y_t) and close(y, y_t)
    assert close(nm, rm_t) and close(nv, rv_t)  # torch updated its copies in place: unbiased var
    assert not close(nv, rv)
    go = rand(g, *x.shape)
    grads = torch.autograd.grad(y, (x, gamma, beta), go)
    grads_t = torch.autograd.grad(y_t, (x, gamma, beta), go)
    assert all(close(a, b) for a, b in zip(grads, grads_t))
    # Evaluation under enable_grad still uses the running statistics.
    with torch.enable_grad():
        ye, em, ev = bn.batch_norm_scratch(x, gamma, beta, nm, nv, training=False, momentum=0.3, eps=1e-4)
    assert close(ye, F.batch_norm(x, nm, nv, gamma, beta, False, 0.3, 1e-4))
    assert em is nm and ev is nv
    # Biased running variance (TF/Keras/D2L).
    _, _, bv = bn.batch_norm_scratch(x, None, None, rm, rv, training=True, momentum=0.3,
                                     unbiased_running_var=False)
    assert close(bv, 0.7 * rv + 0.3 * stats_ref(x.detach())[1])


# ----------------------------------------------------------------------------- against torch

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.37, 1.0, None])
def test_default_variant_matches_torch(impl, layout, momentum):
    g = gen(zlib.crc32(repr((impl, layout, momentum)).encode()))
    ours, ref = pair(layout, g, impl=impl, momentum=momentum)
    for step, n in enumerate((7, 4, 9)):
        ours.train(), ref.train()
        x = batch(g, layout, n) * 2 + rand(g, 1).item()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert close(ya, yb)
        go = rand(g, *ya.shape)
        ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), go)
        gb = torch.autograd.grad(yb, (xb, ref.weight, ref.bias), go)
        for a, b in zip(ga, gb):
            assert close(a, b)
        assert close(ours.running_mean, ref.running_mean)
        assert close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        ours.eval(), ref.eval()
        xe = batch(g, layout, 3).requires_grad_()
        ye, yr = ours(xe), ref(xe)
        assert close(ye, yr)
        assert close(torch.autograd.grad(ye.sum(), xe)[0], torch.autograd.grad(yr.sum(), xe)[0])
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_mode_comes_from_training_flag_not_grad_mode():
    g = gen(5)
    ours, ref = pair("2d", g, impl="scratch")
    x = batch(g, "2d", 6)
    with torch.no_grad():
        y = ours(x)  # training mode under no_grad: batch statistics and an update
    assert close(y, ref(x)) and close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    with torch.enable_grad():
        assert close(ours(x), ref(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["2d", "4d"])
def test_affine_false_matches_torch(impl, layout):
    g = gen(6)
    ours, ref = pair(layout, g, impl=impl, affine=False)
    assert list(ours.parameters()) == [] and ours.weight is None and ours.bias is None
    for n in (5, 3):
        x = batch(g, layout, n).requires_grad_()
        y, yr = ours(x), ref(x)
        assert close(y, yr)
        go = rand(g, *y.shape)
        assert close(torch.autograd.grad(y, x, go)[0], torch.autograd.grad(yr, x, go)[0])
    ours.eval(), ref.eval()
    x = batch(g, layout, 4)
    assert close(ours(x), ref(x))


# ----------------------------------------------------------------------------- variants, closed forms

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["2d", "4d"])
def test_biased_running_var_closed_form(impl, layout):
    g = gen(7)
    m = make(layout, g, momentum=0.2, running_var="biased", impl=impl)
    rm, rv = torch.zeros(m.num_features, dtype=DT), torch.ones(m.num_features, dtype=DT)
    for n in (5, 8, 2):
        x = batch(g, layout, n) * 1.5 + 0.3
        m(x)
        mean, var_b, _ = stats_ref(x)
        rm, rv = 0.8 * rm + 0.2 * mean, 0.8 * rv + 0.2 * var_b
    assert close(m.running_mean, rm) and close(m.running_var, rv)
    # Differs from torch's unbiased convention.
    assert not close(m.running_var, rv * 1.01)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_track_std_closed_form(impl, running_var, momentum):
    g = gen(8)
    m = make("4d", g, momentum=momentum, running_var=running_var, track="std", impl=impl)
    assert "running_std" in m.state_dict() and "running_var" not in m.state_dict()
    c = m.num_features
    rm, rs = torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)
    for t, n in enumerate((4, 6, 3), start=1):
        x = batch(g, "4d", n) * 2 - 1
        m(x)
        mean, var_b, cnt = stats_ref(x)
        var = var_b * cnt / (cnt - 1) if running_var == "unbiased" else var_b
        a = 1.0 / t if momentum is None else momentum
        rm, rs = (1 - a) * rm + a * mean, (1 - a) * rs + a * var.sqrt()
    assert close(m.running_mean, rm) and close(m.running_std, rs)
    m.eval()
    x = batch(g, "4d", 2)
    sh = (1, -1, 1, 1)
    expect = (x - rm.view(sh)) / torch.sqrt(rs.view(sh) ** 2 + m.eps) * m.weight.view(sh) + m.bias.view(sh)
    assert close(m(x), expect.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["2d", "4d"])
def test_update_stats_false_keeps_buffers(impl, layout):
    g = gen(9)
    ours, ref = pair(layout, g, impl=impl, update_stats=False)
    for n in (6, 3, 5):
        x = batch(g, layout, n) + 4
        assert close(ours(x), ref(x))  # training output is torch's
    c = ours.num_features
    assert torch.equal(ours.running_mean, torch.zeros(c, dtype=DT))
    assert torch.equal(ours.running_var, torch.ones(c, dtype=DT))
    assert int(ours.num_batches_tracked) == 0
    ours.eval()
    x = batch(g, layout, 4) + 4
    sh = (1, -1) + (1,) * (x.dim() - 2)
    expect = x / math.sqrt(1 + ours.eps) * ours.weight.view(sh) + ours.bias.view(sh)
    assert close(ours(x), expect.detach())
    bn.set_update_stats(ours, True)
    ours.train()
    ours(x)
    assert int(ours.num_batches_tracked) == 1 and not torch.equal(ours.running_mean, torch.zeros(c, dtype=DT))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_stats_batch_equals_train_mode_without_buffer_change(impl, layout):
    g = gen(10)
    ours, ref = pair(layout, g, impl=impl)
    for n in (5, 7):
        ours(batch(g, layout, n))
    buffers = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.eval()
    ours.eval_stats = "batch"
    x = batch(g, layout, 6) * 3
    y = ours(x)
    fresh = copy.deepcopy(ref).train()
    assert close(y, fresh(x))
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in buffers.items())
    ours.eval_stats = "running"
    assert not close(ours(x), y)
    with pytest.raises(ValueError, match="eval_stats"):
        ours.eval_stats = "train"


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_one_collapses_to_beta(impl):
    g = gen(11)
    model = nn.Sequential(nn.Linear(3, 4), make("2d", g, impl=impl), nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.double()
    with torch.no_grad():
        model[3].bias.copy_(rand(g, 4))
    model(rand(g, 8, 3))
    model.eval()
    x = rand(g, 1, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bn.batch_stats_eval(model) as same:
        assert same is model and model[1].eval_stats == "batch"
        h = model[0](x)
        out1 = model[1](h)
        out = model(x)
    assert torch.equal(out1, model[1].bias.detach().expand(1, 4))
    assert torch.equal(out, model[3].bias.detach().expand(1, 4))  # torch BN collapses too
    assert model[1].eval_stats == "running"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(model(x), out)  # hook removed: running statistics again
    # 4D with one example: statistics over H, W, no collapse.
    m2 = make("4d", g, impl=impl).eval()
    m2.eval_stats = "batch"
    assert not close(m2(batch(g, "4d", 1)), m2.bias.detach().view(1, -1, 1, 1).expand(1, 3, 4, 2))


def test_batch_stats_eval_restores_on_exception_and_matches_torch_module():
    g = gen(12)
    model = nn.Sequential(make("4d", g, impl="native"), nn.BatchNorm2d(3).double())
    model[0].eval_stats = "running"
    model(batch(g, "4d", 5))
    model.eval()
    x = batch(g, "4d", 4)
    with pytest.raises(KeyError):
        with bn.batch_stats_eval(model):
            y = model(x)
            raise KeyError("boom")
    assert model[0].eval_stats == "running" and not model[1]._forward_hooks
    h = F.batch_norm(x, None, None, model[0].weight, model[0].bias, True, 0.0, 1e-5)
    assert close(y, F.batch_norm(h, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-5).detach())


# ----------------------------------------------------------------------------- shadow momenta

SHADOW_VARIANTS = [
    dict(impl="native"),
    dict(impl="scratch"),
    dict(impl="native", running_var="biased", track="std"),
    dict(impl="scratch", momentum=None, track="std"),
]


@pytest.mark.parametrize("variant", SHADOW_VARIANTS, ids=str)
def test_use_shadow_equals_separate_module(variant):
    g = gen(13)
    shadows = (0.01, 0.5, None)
    kw = dict(variant)
    main = make("2d", g, shadow_momenta=shadows, **kw)
    # Same configuration and weights without shadows, and with a different set of shadows.
    plain = bn.BatchNorm1d(4, **kw).to(DT)
    plain.load_state_dict({k: v for k, v in main.state_dict().items() if not k.startswith("shadow")})
    other = bn.BatchNorm1d(4, shadow_momenta=(0.7,), **kw).to(DT)
    other.load_state_dict(plain.state_dict(), strict=False)
    separate = []
    for s in shadows:
        m = bn.BatchNorm1d(4, **{**kw, "momentum": s}).to(DT)
        m.load_state_dict(plain.state_dict())
        separate.append(m)
    for n in (6, 3, 8, 5):
        x = batch(g, "2d", n) * 2 + 1
        y = main(x)
        # Shadows never affect training outputs: bit-identical to other shadows (same code path),
        # equal to rounding to no shadows (native then lets F.batch_norm update the buffers itself).
        assert torch.equal(y, other(x))
        assert close(y, plain(x), rtol=1e-12, atol=1e-12)
        for m in separate:
            m(x)
    assert close(main.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
    assert torch.equal(main.running_mean, other.running_mean)
    main.eval()
    x = batch(g, "2d", 5)
    y_main = main(x)
    buffers = {k: v.clone() for k, v in main.state_dict().items()}
    for k, m in enumerate(separate):
        with bn.use_shadow(main, k):
            y = main(x)
        assert close(y, m.eval()(x), rtol=1e-12, atol=1e-12)
        if shadows[k] != kw.get("momentum", 0.1):
            assert not close(y, y_main)
        assert all(torch.equal(v, main.state_dict()[n]) for n, v in buffers.items())


def test_use_shadow_restores_on_exception_and_validates():
    g = gen(14)
    model = nn.Sequential(make("4d", g, shadow_momenta=(0.05,)), nn.ReLU(), make("4d", g, shadow_momenta=(0.05,)))
    for n in (4, 5):
        model(batch(g, "4d", n))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError):
        with bn.use_shadow(model, 0):
            assert torch.equal(model[0].running_mean, model[0].shadow_mean[0])
            raise KeyError("boom")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with bn.use_shadow(model, 0):
        with pytest.raises(RuntimeError, match="use_shadow"):
            model.train()(batch(g, "4d", 3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for bad in (1, -1, "0"):
        with pytest.raises(ValueError, match="k"):
            with bn.use_shadow(model, bad):
                pass
    with pytest.raises(ValueError, match="k"):
        with bn.use_shadow(nn.Sequential(nn.BatchNorm1d(3)), 0):
            pass


# ----------------------------------------------------------------------------- native == scratch

VARIANTS = [
    dict(),
    dict(momentum=None),
    dict(running_var="biased"),
    dict(track="std"),
    dict(track="std", running_var="biased", momentum=0.6),
    dict(update_stats=False),
    dict(affine=False, shadow_momenta=(0.2, None)),
    dict(momentum=None, shadow_momenta=(0.9,), track="std"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_native_and_scratch_agree(layout, variant):
    g = gen(15)
    nat = make(layout, g, impl="native", **variant)
    scr = make(layout, g, impl="scratch", **variant)
    scr.load_state_dict(nat.state_dict())
    for n in (5, 2, 7):
        x = batch(g, layout, n) * 3 - 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = nat(xa), scr(xb)
        assert close(ya, yb)
        go = rand(g, *ya.shape)
        assert close(torch.autograd.grad(ya, xa, go)[0], torch.autograd.grad(yb, xb, go)[0])
    for (ka, va), (kb, vb) in zip(nat.state_dict().items(), scr.state_dict().items()):
        assert ka == kb and close(va, vb), ka
    nat.eval(), scr.eval()
    x = batch(g, layout, 3)
    assert close(nat(x), scr(x))
    nat.eval_stats = scr.eval_stats = "batch"
    assert close(nat(x), scr(x))


# ----------------------------------------------------------------------------- precise BN

class CountingBatches:
    """Batches of the given sizes as (x, y) tuples; counts how many were pulled."""

    def __init__(self, xs):
        self.xs, self.pulled = xs, 0

    def __iter__(self):
        for x in self.xs:
            self.pulled += 1
            yield x, torch.zeros(len(x))


def pop_stats(h, unbiased=True):
    mean, var_b, n = stats_ref(h)
    return mean, var_b * n / (n - 1) if unbiased else var_b


def train_norm(h, bnm):
    """Train-mode normalisation of one batch with bnm's affine parameters (no buffer use)."""
    w = bnm.weight if bnm.weight is not None else None
    return F.batch_norm(h, None, None, w, bnm.bias, True, 0.0, bnm.eps)


@pytest.mark.parametrize("impl", IMPLS)
def test_precise_bn_mlp_closed_form(impl):
    g = gen(16)
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(5, 4), bn.BatchNorm1d(4, impl=impl), nn.ReLU(), nn.Linear(4, 3),
                          bn.BatchNorm1d(3, impl=impl, running_var="biased")).double()
    for n in (8, 8):  # some training so the buffers are not at their initial values
        model(rand(g, n, 5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = (7, 5, 9, 6)
    xs = [rand(g, n, 5) * 2 + 1 for n in sizes]
    source = CountingBatches(xs)
    out = bn.precise_bn(model, source, 20)  # 7 + 5 + 8 of the 9
    assert source.pulled == 3 and out is not model and not out.training
    # Closed form: layer inputs per batch with frozen weights, statistics over all 20 examples at once.
    h1s, h2s = [], []
    with torch.no_grad():
        for x in (xs[0], xs[1], xs[2][:8]):
            h1 = model[0](x)
            h2 = model[3](F.relu(train_norm(h1, model[1])))
            h1s.append(h1), h2s.append(h2)
    m1, v1 = pop_stats(torch.cat(h1s))
    m2, v2 = pop_stats(torch.cat(h2s), unbiased=False)
    assert close(out[1].running_mean, m1) and close(out[1].running_var, v1)
    assert close(out[4].running_mean, m2) and close(out[4].running_var, v2)
    assert torch.equal(out[1].num_batches_tracked, before["1.num_batches_tracked"])
    # The input model is untouched (buffers, parameters, mode).
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    err = bn.running_stats_error(model, out)
    assert err["mean_err"] > 0 and err["var_err"] > 0
    assert bn.running_stats_error(out, out) == {"mean_err": 0.0, "var_err": 0.0}
    # inplace=True changes the model itself and gives the same statistics.
    same = bn.precise_bn(model, CountingBatches(xs), 20, inplace=True)
    assert same is model and not model.training
    assert close(model[1].running_var, v1) and close(model[4].running_mean, m2)


@pytest.mark.parametrize("kind", ["native", "scratch", "torch"])
def test_precise_bn_conv_closed_form(kind):
    g = gen(17)
    torch.manual_seed(17)
    if kind == "torch":
        bn1, bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(2)
    else:
        bn1 = bn.BatchNorm2d(3, impl=kind)
        bn2 = bn.BatchNorm2d(2, impl=kind, track="std", shadow_momenta=(0.3,))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn1, nn.ReLU(), nn.Conv2d(3, 2, 1), bn2).double()
    model(rand(g, 4, 2, 6, 6))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = [rand(g, n, 2, 6, 6) for n in (3, 4, 4)]
    out = bn.precise_bn(model, iter(xs), 10)  # plain tensors; 3 + 4 + 3 of the last 4
    h1s, h2s = [], []
    with torch.no_grad():
        for x in (xs[0], xs[1], xs[2][:3]):
            h1 = model[0](x)
            h1s.append(h1), h2s.append(model[3](F.relu(train_norm(h1, model[1]))))
    m1, v1 = pop_stats(torch.cat(h1s))
    m2, v2 = pop_stats(torch.cat(h2s))
    assert close(out[1].running_mean, m1) and close(out[1].running_var, v1)
    var2 = out[4].running_std ** 2 if kind != "torch" else out[4].running_var
    assert close(out[4].running_mean, m2) and close(var2, v2)
    if kind != "torch":  # shadows are not recalibrated
        assert torch.equal(out[4].shadow_mean, before["4.shadow_mean"])
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_precise_bn_native_and_scratch_agree_and_edge_cases():
    g = gen(18)

    def build(impl):
        torch.manual_seed(18)
        return nn.Sequential(nn.Linear(3, 4), bn.BatchNorm1d(4, impl=impl), nn.Tanh(), nn.Linear(4, 2),
                             bn.BatchNorm1d(2, impl=impl)).double()

    xs = [rand(g, n, 3) for n in (6, 1, 5)]  # a batch of one is merged with its neighbour
    a = bn.precise_bn(build("native"), xs, 100)  # runs out early: uses all 12
    b = bn.precise_bn(build("scratch"), xs, 12)
    assert bn.running_stats_error(a, b)["var_err"] < 1e-12
    m1, v1 = pop_stats(build("native")[0](torch.cat(xs)).detach())
    assert close(a[1].running_mean, m1) and close(a[1].running_var, v1)
    model = build("native")
    with pytest.raises(ValueError, match="num_samples"):
        bn.precise_bn(model, xs, 1)
    with pytest.raises(ValueError, match="batches"):
        bn.precise_bn(model, [], 10)
    with pytest.raises(ValueError, match="batches"):
        bn.precise_bn(model, [rand(g, 1, 3)], 10)
    with pytest.raises(ValueError, match="model"):
        bn.precise_bn(nn.Linear(3, 3), xs, 10)
    assert model.training  # failures leave the model as it was


def test_running_stats_error_definition():
    g = gen(19)
    ref = nn.Sequential(make("2d", g), make("2d", g, track="std"))
    for n in (5, 6):
        ref(batch(g, "2d", n))
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other[0].running_mean.mul_(1.5)  # layer 0: mean error 0.5
        other[1].running_std.mul_(2.0)  # layer 1: var = std^2 quadruples, error 3
    err = bn.running_stats_error(other, ref)
    assert math.isclose(err["mean_err"], 0.25, rel_tol=1e-9)
    assert math.isclose(err["var_err"], 1.5, rel_tol=1e-9)
    with pytest.raises(ValueError, match="reference_model"):
        bn.running_stats_error(other, nn.Sequential(make("2d", g)))


# ----------------------------------------------------------------------------- misc

def test_buffers_registered_and_model_helpers():
    g = gen(20)
    m = make("4d", g, shadow_momenta=(0.1, 0.2), track="std")
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked",
                       "shadow_mean", "shadow_std"}
    assert sd["shadow_mean"].shape == (2, 3) and sd["num_batches_tracked"].dtype == torch.long
    assert all(b.dtype == DT for n, b in m.named_buffers() if n != "num_batches_tracked")
    r = repr(m)
    assert "track='std'" in r and "shadow_momenta=(0.1, 0.2)" in r and "momentum=0.1" in r
    model = nn.Sequential(nn.Linear(2, 3), bn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)), m)
    assert bn.bn_modules(model) == [model[1], model[2][0], m]
    with pytest.raises(ValueError, match="flag"):
        bn.set_update_stats(nn.Sequential(m), 0)
    with pytest.raises(ValueError, match="torch BatchNorm"):
        bn.set_update_stats(model, False)
    bn.set_update_stats(nn.Sequential(m), False)
    assert m.update_stats is False
    # torch state_dict loads into the default variant.
    ours, ref = pair("2d", g)
    ref(batch(g, "2d", 5))
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.running_var, ref.running_var)


@pytest.mark.parametrize("kwargs, name", [
    (dict(momentum=1.5), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(running_var="foo"), "running_var"),
    (dict(track="bar"), "track"),
    (dict(impl="x"), "impl"),
    (dict(eps=-1.0), "eps"),
    (dict(affine="yes"), "affine"),
    (dict(update_stats=1), "update_stats"),
    (dict(shadow_momenta=(0.1, 2.0)), "shadow_momenta"),
    (dict(shadow_momenta=0.1), "shadow_momenta"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bn.BatchNorm2d(3, **kwargs)


def test_bad_inputs_raise_value_error():
    g = gen(21)
    with pytest.raises(ValueError, match="num_features"):
        bn.BatchNorm1d(0)
    with pytest.raises(ValueError, match="input must be 2D or 3D"):
        bn.BatchNorm1d(4)(rand(g, 2, 4, 3, 3).float())
    with pytest.raises(ValueError, match="input must be 4D"):
        bn.BatchNorm2d(4)(rand(g, 2, 4).float())
    with pytest.raises(ValueError, match="num_features=4"):
        bn.BatchNorm1d(4)(rand(g, 2, 5).float())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.BatchNorm1d(4, impl="scratch")(rand(g, 1, 4).float())
    with pytest.raises(ValueError, match="x must"):
        bn.batch_stats(rand(g, 4))
    with pytest.raises(ValueError, match="gamma"):
        bn.normalize(rand(g, 3, 4), torch.zeros(4), torch.ones(4), torch.ones(3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(impl, dtype):
    g = gen(22)
    m = bn.BatchNorm2d(3, impl=impl, shadow_momenta=(0.1,))
    x = (torch.randn(4, 3, 5, 5, generator=g) * 3 + 2).to(dtype)
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert close(y.float(), F.batch_norm(x.float(), None, None, training=True), rtol=0, atol=0.05)
    assert m.running_mean.dtype == torch.float32 and not torch.equal(m.running_mean, torch.zeros(3))
    m.eval()
    assert m(x).dtype == dtype and torch.isfinite(m(x)).all()
    # Half-precision parameters and buffers (model.half()) and autocast around a Linear.
    mh = bn.BatchNorm1d(4, impl=impl).to(dtype)
    assert mh(torch.randn(6, 4, generator=g).to(dtype)).dtype == dtype
    net = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm1d(4, impl=impl))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(6, 3, generator=g))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_buffers_follow_device_and_match_torch(impl):
    g = gen(23)
    ours, ref = pair("4d", g, impl=impl)
    ours.cuda(), ref.cuda()
    assert ours.running_var.device.type == "cuda" and ours.num_batches_tracked.device.type == "cuda"
    for n in (4, 6):
        x = batch(g, "4d", n).cuda()
        assert close(ours(x), ref(x))
    assert close(ours.running_mean, ref.running_mean) and close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = batch(g, "4d", 3).cuda()
    assert close(ours(x), ref(x))

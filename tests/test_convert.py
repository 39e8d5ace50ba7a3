"""convert_bn: torch BN <-> bnlab BN on a ResNet and on a model with nested and shared BN modules;
outputs, gradients and buffers equal to torch's in float64, train and eval, on fresh random inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab import bn
from bnlab.config import BNConfig, ModelConfig, ModelName
from bnlab.models import build_model


class Block(nn.Module):
    """A torchvision-style basic block with a projection shortcut (conv + BN): not bnlab's ResNet."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.3)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList([Block(8, 8, 1), Block(8, 16, 2)])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Linear(32, 5))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(F.adaptive_avg_pool2d(x, 4))


class Shared(nn.Module):
    """Nested containers and one BN module registered under two parents and applied twice."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(6)
        self.inner = nn.ModuleDict({"a": nn.Sequential(nn.Linear(6, 6), self.norm),
                                    "b": nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, affine=False))])})
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner["a"](x))
        h = torch.tanh(self.norm(h))  # the same BN again
        return self.out(self.inner["b"][0](h))


def _randomise_buffers(model: nn.Module, gen: torch.Generator) -> None:
    # A "trained" model: running statistics and affine parameters away from their initial values.
    with torch.no_grad():
        for m in bn.bn_modules(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
            m.num_batches_tracked.fill_(7)
            if m.affine:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))


def _steps(model: nn.Module, xs, ys, lr=0.1):
    """Train-mode SGD steps; returns outputs and parameter gradients of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record = []
    model.train()
    for x, y in zip(xs, ys):
        x = x.clone().requires_grad_(True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        record.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return record


def _assert_same(a: nn.Module, b: nn.Module, xs, ys, x_eval):
    """Equal eval outputs, then equal outputs and gradients over SGD steps, then equal state."""
    a.eval()
    b.eval()
    torch.testing.assert_close(b(x_eval), a(x_eval))
    for (oa, ga, pa), (ob, gb, pb) in zip(_steps(a, xs, ys), _steps(b, xs, ys)):
        torch.testing.assert_close(ob, oa)
        torch.testing.assert_close(gb, ga)
        assert pa.keys() == pb.keys()
        for k in pa:
            torch.testing.assert_close(pb[k], pa[k], msg=k)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], msg=k)
    a.eval()
    b.eval()
    torch.testing.assert_close(b(x_eval), a(x_eval))


def _data(shape, classes, seed, n=3, batch=8):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, *shape, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(n)]
    ys = [torch.randint(0, classes, (batch,), generator=g) for _ in range(n)]
    return xs, ys, torch.randn(5, *shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_resnet_to_bnlab_and_back(seed):
    torch.manual_seed(seed)
    ref = TinyResNet().double()
    _randomise_buffers(ref, torch.Generator().manual_seed(seed + 10))
    conv = bnlab.convert_bn(ref)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in conv.modules())
    kinds = [type(m) for m in bn.bn_modules(conv)]
    assert kinds.count(bn.BatchNorm2d) == 6 and kinds.count(bn.BatchNorm1d) == 1
    assert conv.layers[0].bn2.momentum == 0.3, "options not given come from the old layer"
    xs, ys, x_eval = _data((3, 8, 8), 5, seed)
    _assert_same(copy.deepcopy(ref), copy.deepcopy(conv), xs, ys, x_eval)
    back = bnlab.convert_bn(conv, to="torch")
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in bn.bn_modules(back))
    _assert_same(copy.deepcopy(ref), back, xs, ys, x_eval)


def test_bnlab_resnet20_to_torch_and_back():
    torch.manual_seed(3)
    ours = build_model(ModelConfig(name=ModelName.resnet20), BNConfig(), (3, 16, 16), 10).double()
    _randomise_buffers(ours, torch.Generator().manual_seed(4))
    plain = bnlab.convert_bn(ours, to="torch")
    assert len(bn.bn_modules(plain)) == 19
    xs, ys, x_eval = _data((3, 16, 16), 10, 5, n=2)
    _assert_same(copy.deepcopy(ours), copy.deepcopy(plain), xs, ys, x_eval)
    _assert_same(copy.deepcopy(ours), bnlab.convert_bn(plain), xs, ys, x_eval)


def test_nested_and_shared_modules_stay_shared():
    torch.manual_seed(0)
    ref = Shared().double()
    _randomise_buffers(ref, torch.Generator().manual_seed(1))
    conv = bnlab.convert_bn(ref, impl="scratch")
    assert conv.norm is conv.inner["a"][1], "a BN shared by two parents becomes one shared new BN"
    assert isinstance(conv.norm, bn.BatchNorm1d) and conv.norm.impl == "scratch"
    assert not conv.inner["b"][0][1].affine
    assert len(bn.bn_modules(conv)) == 2  # modules() lists a shared module once
    xs, ys, x_eval = _data((6,), 3, 2)
    _assert_same(copy.deepcopy(ref), copy.deepcopy(conv), xs, ys, x_eval)
    _assert_same(copy.deepcopy(ref), bnlab.convert_bn(conv, to="torch"), xs, ys, x_eval)


def test_copy_by_default_inplace_keeps_parameters_and_mode():
    torch.manual_seed(0)
    ref = TinyResNet()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.eval()
    conv = bnlab.convert_bn(ref)
    assert all(isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.BatchNorm1d) for m in bn.bn_modules(ref))
    assert all(not m.training for m in conv.modules()), "train/eval mode carried over"
    params = {id(p) for p in ref.parameters()}
    same = bnlab.convert_bn(ref, inplace=True)
    assert same is ref and {id(p) for p in same.parameters()} == params, "same Parameter objects"
    for k, v in before.items():
        torch.testing.assert_close(same.state_dict()[k], v)
    single = bnlab.convert_bn(nn.BatchNorm2d(4))
    assert type(single) is bn.BatchNorm2d


def test_options_apply_and_shadows_start_from_running_stats():
    torch.manual_seed(0)
    ref = TinyResNet().double()
    _randomise_buffers(ref, torch.Generator().manual_seed(2))
    conv = bnlab.convert_bn(ref, decay=0.99, update_stats=False, shadow_momenta=[0.5, 0.01])
    m = conv.stem[1]
    assert m.momentum == pytest.approx(0.01) and not m.update_stats
    torch.testing.assert_close(m.shadow_mean, ref.stem[1].running_mean.expand(2, -1))
    torch.testing.assert_close(m.shadow_var, ref.stem[1].running_var.expand(2, -1))
    frozen = {k: v.clone() for k, v in conv.state_dict().items() if "running" in k}
    conv.train()
    conv(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    for k, v in frozen.items():
        torch.testing.assert_close(conv.state_dict()[k], v, msg=k)  # update_stats=False: never moved
    std = bnlab.convert_bn(ref, track="std")
    torch.testing.assert_close(std.stem[1].running_std.square(), ref.stem[1].running_var)


def test_torch_bn_without_running_stats_becomes_batch_statistics():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False)).double()
    conv = bnlab.convert_bn(ref)
    assert conv[1].eval_stats == "batch" and not conv[1].update_stats
    x = torch.randn(16, 4, dtype=torch.float64)
    for mode in (True, False):
        ref.train(mode)
        conv.train(mode)
        torch.testing.assert_close(conv(x), ref(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"mommentum": 0.1}, "mommentum is not an option"),
    ({"momentum": 0.1, "decay": 0.9}, "momentum or decay, not both"),
    ({"to": "tf"}, "to must be 'bnlab' or 'torch'"),
    ({"to": "torch", "shadow_momenta": [0.1]}, "shadow_momenta is not an option of convert_bn\\(to='torch'\\)"),
])
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnlab.convert_bn(TinyResNet(), **kwargs)


@pytest.mark.parametrize("option, value", [("running_var", "biased"), ("track", "std"),
                                           ("shadow_momenta", (0.1,)), ("update_stats", False)])
def test_to_torch_refuses_what_torch_cannot_express(option, value):
    model = bnlab.convert_bn(TinyResNet(), **{option: value})
    with pytest.raises(ValueError, match=f"to='torch' needs {option}="):
        bnlab.convert_bn(model, to="torch")

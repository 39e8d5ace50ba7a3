"""Every bn.* option applies to the model that runs, or is refused up front: each field of BNConfig
set to a non-default value on every model kind, and the built modules checked for it."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab import bn as bnm
from bnlab.config import (BNConfig, Config, ConfigError, ModelConfig, ModelName, Placement, RunningVar, Track, Impl)
from bnlab.models import build_model

KINDS = {"lenet": (1, 28, 28), "mlp": (1, 28, 28), "resnet20": (3, 32, 32), "custom": (3, 32, 32)}


class NoBN(nn.Module):
    """A user's model without any BN layer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def forward(self, x):
        return self.net(x)


def _model_cfg(kind: str) -> ModelConfig:
    if kind == "custom":
        return ModelConfig(name=ModelName.custom, target="test_models_data:TinyNet", kwargs={"width": 4})
    return ModelConfig(name=ModelName(kind))


def _batches(shape, n=4, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, *shape, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def _layers(model):
    return bnm.bn_modules(model)


# (field, non-default value, check on every BN layer of the built model or on the model itself)
CASES = {
    "momentum": (0.01, lambda m, ls: all(x.momentum == 0.01 for x in ls)),
    "decay": (0.99, lambda m, ls: all(x.momentum == pytest.approx(0.01) for x in ls)),
    "update_stats": (False, lambda m, ls: all(x.update_stats is False for x in ls)),
    "eps": (1e-3, lambda m, ls: all(x.eps == 1e-3 for x in ls)),
    "running_var": (RunningVar.biased, lambda m, ls: all(x.running_var_mode == "biased" for x in ls)),
    "track": (Track.std, lambda m, ls: all(x.track == "std" for x in ls)),
    "affine": (False, lambda m, ls: all(not x.affine and x.weight is None and x.bias is None for x in ls)),
    "impl": (Impl.scratch, lambda m, ls: all(x.impl == "scratch" for x in ls)),
    "shadow_momenta": ([0.01, 0.3], lambda m, ls: all(tuple(x.shadow_momenta) == (0.01, 0.3) for x in ls)),
    "ghost_batch_size": (4, lambda m, ls: all(x.ghost_batch_size == 4 for x in ls)),
}


def _all_bnlab(model):
    layers = _layers(model)
    return bool(layers) and all(isinstance(x, bnm.BatchNorm) for x in layers) and \
        not any(isinstance(x, _BatchNorm) for x in model.modules())


def _precise_moves_stats(model, shape):
    """precise BN (bn.precise_samples, bn.precise_sizes) recomputes every layer's statistics."""
    out = bnm.precise_bn(model, _batches(shape), 16)
    return all(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(_layers(model), _layers(out)))


def _freezes(model, shape):
    bnm.freeze(model, _batches(shape), 16)
    return bnm.is_frozen(model) and all(x.frozen for x in _layers(model))


def test_the_table_covers_every_bn_field():
    handled = set(CASES) | {"placement", "precise_samples", "precise_sizes", "freeze_at"}
    assert handled == {f.name for f in dataclasses.fields(BNConfig)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", sorted(CASES))
def test_every_layer_option_reaches_every_bn_layer(kind, field):
    value, check = CASES[field]
    b = BNConfig(**{field: value})
    Config(model=_model_cfg(kind), bn=b)  # valid as a whole config
    model = build_model(_model_cfg(kind), b, KINDS[kind])
    layers = _layers(model)
    assert layers and _all_bnlab(model)
    assert check(model, layers), f"bn.{field}={value!r} not carried by the {kind} model's BN layers"
    with torch.no_grad():
        model.train()
        assert model(torch.randn(8, *KINDS[kind])).shape == (8, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_model_level_options_apply_to_every_kind(kind):
    shape = KINDS[kind]
    # precise_samples / precise_sizes: precise BN recomputes the statistics of every layer
    model = build_model(_model_cfg(kind), BNConfig(precise_samples=64, precise_sizes=[16]), shape)
    assert _all_bnlab(model) and _precise_moves_stats(model, shape)
    # freeze_at: FrozenBN freezes every layer
    Config(model=_model_cfg(kind), bn=BNConfig(freeze_at=1))
    assert _freezes(build_model(_model_cfg(kind), BNConfig(freeze_at=1), shape), shape)
    # placement: the built-ins place BN after the activation; a user's model keeps its own (refused)
    if kind == "custom":
        with pytest.raises(ConfigError, match="bn.placement"):
            Config(model=_model_cfg(kind), bn=BNConfig(placement=Placement.after_act))
    else:
        m = build_model(_model_cfg(kind), BNConfig(placement=Placement.after_act), shape)
        seq = [x for x in m.modules() if isinstance(x, (nn.Sigmoid, nn.ReLU, bnm.BatchNorm))]
        assert isinstance(seq[0], (nn.Sigmoid, nn.ReLU)) and isinstance(seq[1], bnm.BatchNorm)
        assert not _layers(build_model(_model_cfg(kind), BNConfig(placement=Placement.none), shape))


@pytest.mark.parametrize("field", sorted(set(CASES) | {"freeze_at"}))
def test_layer_options_without_bn_layers_are_refused(field):
    value = CASES[field][0] if field in CASES else 1
    with pytest.raises(ConfigError, match=f"bn.{field}"):
        Config(bn=BNConfig(placement=Placement.none, **{field: value}))
    m = ModelConfig(name=ModelName.custom, target="test_bn_options:NoBN")
    with pytest.raises(ConfigError, match=f"bn.{field}.*no BatchNorm"):
        build_model(m, BNConfig(**{field: value}), (3, 32, 32))
    # defaults are fine on a model without BN
    assert not _layers(build_model(m, BNConfig(), (3, 32, 32)))


def test_affine_false_refuses_to_drop_trained_gamma_beta():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        net[1].weight.fill_(2.0)
    with pytest.raises(ValueError, match="affine=False"):
        bnm.convert_bn(net, affine=False)
    # adding gamma = 1, beta = 0 to a layer without them keeps its outputs
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)).double()
    new = bnm.convert_bn(plain, affine=True)
    x = torch.randn(16, 4, dtype=torch.float64)
    assert new[1].affine and torch.allclose(new(x), plain(x))

"""Model registry (lenet, mlp). One function, `block`, decides where BN sits."""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from bnlab import bn as bnm
from bnlab.config import Activation, BNConfig, ModelConfig, Placement, Pool


def _activation(name: Activation) -> nn.Module:
    return nn.Sigmoid() if name == Activation.sigmoid else nn.ReLU()


def make_bn(num_features: int, dims: int, cfg: BNConfig) -> nn.Module:
    """A bnlab BatchNorm for dense (dims=1) or conv (dims=2) features, configured from bn.*."""
    cls = bnm.BatchNorm1d if dims == 1 else bnm.BatchNorm2d
    return cls(num_features, momentum=cfg.momentum, eps=cfg.eps, affine=cfg.affine,
               running_var=cfg.running_var.value, track=cfg.track.value,
               update_stats=cfg.update_stats, impl=cfg.impl.value,
               shadow_momenta=tuple(cfg.shadow_momenta), ghost_batch_size=cfg.ghost_batch_size)


def block(layer: nn.Module, num_features: int, dims: int, activation: Activation,
          cfg: BNConfig) -> List[nn.Module]:
    """layer -> BN -> act (before_act), layer -> act -> BN (after_act), or layer -> act (none).
    The only place that decides BN placement."""
    act = _activation(activation)
    if cfg.placement == Placement.none:
        return [layer, act]
    norm = make_bn(num_features, dims, cfg)
    return [layer, norm, act] if cfg.placement == Placement.before_act else [layer, act, norm]


def lenet(m: ModelConfig, b: BNConfig) -> nn.Module:
    """LeNet-5 with BN as in Dive into Deep Learning 7.5: 28x28 input, no padding, 2x2 pooling
    (model.pool: average as in the PyTorch edition, max as in the MXNet edition)."""
    pool = nn.MaxPool2d if m.pool == Pool.max else nn.AvgPool2d
    return nn.Sequential(
        *block(nn.Conv2d(1, 6, kernel_size=5), 6, 2, m.activation, b),
        pool(kernel_size=2, stride=2),
        *block(nn.Conv2d(6, 16, kernel_size=5), 16, 2, m.activation, b),
        pool(kernel_size=2, stride=2),
        nn.Flatten(),
        *block(nn.Linear(16 * 4 * 4, 120), 120, 1, m.activation, b),
        *block(nn.Linear(120, 84), 84, 1, m.activation, b),
        nn.Linear(84, 10),
    )


def mlp(m: ModelConfig, b: BNConfig) -> nn.Module:
    """A fully connected network over the flattened 28x28 image."""
    layers: List[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for h in m.hidden:
        layers += block(nn.Linear(width, h), h, 1, m.activation, b)
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS: Dict[str, Callable[[ModelConfig, BNConfig], nn.Module]] = {"lenet": lenet, "mlp": mlp}


def build_model(m: ModelConfig, b: BNConfig) -> nn.Module:
    return MODELS[m.name.value](m, b)

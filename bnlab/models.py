"""Model registry keyed by short names (lenet, mlp, resnet20, custom). One function, `block`, decides
where BN sits in the built-ins; a user's model (model.target) keeps its own and has its BN converted."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bnlab import bn as bnm
from bnlab.config import Activation, BNConfig, ConfigError, ModelConfig, Placement, Pool


def _activation(name: Activation) -> nn.Module:
    return nn.Sigmoid() if name == Activation.sigmoid else nn.ReLU()


def bn_kwargs(b: BNConfig) -> dict:
    """bn.* as keyword arguments of bnlab's BatchNorm: the ONE mapping, for the built-in models
    (make_bn) and for a user's model (convert_bn). bn.decay is already bn.momentum (BNConfig);
    bn.placement, precise_samples, precise_sizes and freeze_at act in block() and train()."""
    return dict(momentum=b.momentum, eps=b.eps, affine=b.affine, running_var=b.running_var.value,
                track=b.track.value, update_stats=b.update_stats, impl=b.impl.value,
                shadow_momenta=tuple(b.shadow_momenta), ghost_batch_size=b.ghost_batch_size)


def make_bn(num_features: int, dims: int, cfg: BNConfig) -> nn.Module:
    """A bnlab BatchNorm for dense (dims=1) or conv (dims=2) features, configured from bn.*."""
    cls = bnm.BatchNorm1d if dims == 1 else bnm.BatchNorm2d
    return cls(num_features, **bn_kwargs(cfg))


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


# ----------------------------------------------------------------------------- ResNet-20

class _Residual(nn.Module):
    """A basic block (two 3x3 convolutions) of the CIFAR ResNets, He et al. 2016 sec. 4.2. `block`
    places BN; whatever it puts before the activation runs before the residual addition (before_act:
    conv -> BN -> + -> act, the paper's), the activation and what follows it after (after_act:
    conv -> + -> act -> BN)."""

    def __init__(self, cin: int, cout: int, stride: int, activation: Activation, b: BNConfig):
        super().__init__()
        bias = b.placement != Placement.before_act  # a BN right after the conv makes its bias redundant
        self.first = nn.Sequential(*block(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), cout, 2, activation, b))
        second = block(nn.Conv2d(cout, cout, 3, 1, 1, bias=bias), cout, 2, activation, b)
        act = type(_activation(activation))
        cut = next(i for i, layer in enumerate(second) if type(layer) is act)
        self.pre_add, self.post_add = nn.Sequential(*second[:cut]), nn.Sequential(*second[cut:])
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of the paper (its CIFAR models): identity, subsampled and zero-padded to the new
        # width where the stage changes, so ResNet-20 has no extra parameters (0.27M in all).
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_add(self.pre_add(self.first(x)) + self.shortcut(x))


def resnet20(m: ModelConfig, b: BNConfig, shape: Sequence[int] = (3, 32, 32), classes: int = 10,
             depth: int = 20) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016, sec. 4.2): a 3x3 conv with 16 filters, three stages of
    (depth-2)/6 basic blocks with 16, 32, 64 filters (stride 2 into stages 2 and 3), global average
    pooling, a linear classifier; BN after every convolution. Any input size with C channels."""
    if len(shape) != 3:
        raise ConfigError(f"model=resnet20 needs image examples (C, H, W), the data has shape {tuple(shape)}")
    n = (depth - 2) // 6
    bias = b.placement != Placement.before_act
    layers: List[nn.Module] = block(nn.Conv2d(shape[0], 16, 3, 1, 1, bias=bias), 16, 2, m.activation, b)
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(_Residual(cin, width, 2 if stage > 0 and i == 0 else 1, m.activation, b))
            cin = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            # He et al. 2015 initialisation, as the paper (and torchvision's ResNets) use.
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return model


# ----------------------------------------------------------------------------- custom models

def _import_target(target: str) -> Callable:
    """'package.module:attr' -> the object; the working directory is on the import path, so a
    researcher's own file next to where they run bnlab-train is found."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # ImportError, AttributeError, or an error inside the user's module
        raise ConfigError(f"model.target={target!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"it must be 'package.module:factory' on the import path") from e
    if not callable(obj):
        raise ConfigError(f"model.target={target!r} is a {type(obj).__name__}, not a class or function")
    return obj


def custom(m: ModelConfig, b: BNConfig) -> nn.Module:
    """The user's nn.Module class or factory called with model.kwargs; its torch/bnlab BN layers
    become bnlab BatchNorms with the bn.* options (bnlab.convert_bn), parameters carried over."""
    factory = _import_target(m.target)
    try:
        model = factory(**m.kwargs)
    except Exception as e:  # the user's code: one line, not a traceback through bnlab
        raise ConfigError(f"model.target={m.target!r} failed with model.kwargs={dict(m.kwargs)!r} "
                          f"({type(e).__name__}: {e})") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target={m.target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not bnm.bn_modules(model):
        # No BN to carry the options: a bn.* setting would be logged and ignored.
        changed = b.layer_settings_changed()
        if changed:
            raise ConfigError(f"{changed[0]} cannot apply: model.target={m.target!r} has no BatchNorm layer "
                              f"(leave bn.* at their defaults for a model without BN)")
        return model
    try:
        return bnm.convert_bn(model, inplace=True, **bn_kwargs(b))
    except ValueError as e:  # e.g. bn.affine=false over gamma/beta the factory already set
        raise ConfigError(f"model.target={m.target!r}: the bn.* options cannot apply to its BN layers ({e})") from e


@dataclass(frozen=True)
class Entry:
    """A registered model: its builder and the example shape it needs (None = any: the builder
    reads the data's shape; synthetic data then defaults to `synthetic_shape`)."""

    build: Callable[..., nn.Module]
    shape: Optional[Tuple[int, ...]]
    synthetic_shape: Tuple[int, ...]
    uses_shape: bool = False
    # How run descriptions name it (bnlab.describe.run_description), from its config.
    title: Callable[[ModelConfig], str] = lambda m: m.name.value


MODELS: Dict[str, Entry] = {
    "lenet": Entry(lenet, (1, 28, 28), (1, 28, 28),
                   title=lambda m: f"LeNet ({m.activation.value}{', max pooling' if m.pool == Pool.max else ''})"),
    "mlp": Entry(mlp, (1, 28, 28), (1, 28, 28), title=lambda m: f"MLP {list(m.hidden)} ({m.activation.value})"),
    "resnet20": Entry(resnet20, None, (3, 32, 32), uses_shape=True,
                      title=lambda m: f"ResNet-20 ({m.activation.value})"),
    "custom": Entry(custom, None, (3, 32, 32), title=lambda m: f"your model {m.target}"
                    + (f" {dict(m.kwargs)}" if m.kwargs else "")),
}


def natural_shape(m: ModelConfig) -> Tuple[int, ...]:
    """The example shape a model is made for: what synthetic data takes when data.synthetic_shape is null."""
    return MODELS[m.name.value].synthetic_shape


def build_model(m: ModelConfig, b: BNConfig, shape: Optional[Sequence[int]] = None,
                classes: int = 10) -> nn.Module:
    """The registered model for examples of `shape` (None = the model's own) and `classes` outputs.
    A built-in made for one shape refuses data of another with one line naming both."""
    entry = MODELS[m.name.value]
    shape = tuple(shape) if shape is not None else entry.synthetic_shape
    if entry.shape is not None and shape != entry.shape:
        raise ConfigError(f"model={m.name.value} needs examples of shape {'x'.join(map(str, entry.shape))}, "
                          f"the data has {'x'.join(map(str, shape))}: use model=resnet20 or model=custom, "
                          f"or data.synthetic_shape")
    if entry.uses_shape:
        return entry.build(m, b, shape, classes)
    return entry.build(m, b)


def check_model(m: ModelConfig, b: BNConfig, shape: Sequence[int], classes: int) -> None:
    """Build the model and run two examples through it (eval mode), so that a model that does not
    fit the data fails with one line before anything runs."""
    try:
        model = build_model(m, b, shape, classes)
    except ConfigError:
        raise
    except Exception as e:  # e.g. a layer too large to allocate, a user's factory that raises
        raise ConfigError(f"model={m.name.value} cannot be built ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})") from e
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *shape))
    except Exception as e:  # shape mismatch inside the user's or a built-in model
        raise ConfigError(f"model={m.name.value} cannot take examples of shape {tuple(shape)} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(out, torch.Tensor) or out.shape != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model={m.name.value} must output (batch, {classes}) class scores for this "
                          f"data, got {got}")

"""Batch Normalization for bnlab: from-scratch maths, a BN module that covers the PyTorch and
TensorFlow running-statistics conventions (plus shadow EMAs), and whole-model helpers such as precise-BN."""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from collections.abc import Iterable as _IterableABC
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "momentum_from_decay", "decay_from_momentum", "batch_stats", "normalize", "ema_update",
    "batch_norm_scratch", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "bn_modules",
    "batch_stats_eval", "use_shadow", "precise_bn", "running_stats_error", "set_update_stats",
]

# Inputs in these dtypes are normalised in float32 and cast back: the batch variance of
# float16/bfloat16 activations loses too many bits (the same reason autocast keeps norms in fp32).
_HALF_DTYPES = (torch.float16, torch.bfloat16)
RUNNING_VAR_CHOICES = ("unbiased", "biased")
TRACK_CHOICES = ("var", "std")
IMPL_CHOICES = ("native", "scratch")
EVAL_STATS_CHOICES = ("running", "batch")


# ----------------------------------------------------------------------------- validation

def _check_fraction(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    """A real number in [0, 1] (or None where allowed) as float; ValueError naming `name` otherwise."""
    if value is None and allow_none:
        return None
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and 0.0 <= float(value) <= 1.0)  # NaN fails both comparisons
    if not ok:
        allowed = "[0, 1] or None" if allow_none else "[0, 1]"
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return float(value)


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_eps(value) -> float:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(float(value)) and float(value) >= 0.0)
    if not ok:
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- pure functions

def momentum_from_decay(decay: float) -> float:
    """PyTorch momentum (weight of the new batch statistic) from a TF/Keras/MXNet decay
    (weight of the old running value): momentum = 1 - decay. The one conversion place in bnlab."""
    return 1.0 - _check_fraction("decay", decay)


def decay_from_momentum(momentum: float) -> float:
    """TF/Keras/MXNet decay from a PyTorch momentum: decay = 1 - momentum."""
    return 1.0 - _check_fraction("momentum", momentum)


def _reduce_dims(x: Tensor) -> Tuple[int, ...]:
    # torch.nn.BatchNorm{1,2,3}d convention: one statistic per channel (dim 1), reduced over the
    # batch dim and every spatial/temporal dim: (0,) for (N, C), (0, 2) for (N, C, L), (0, 2, 3) ...
    if not isinstance(x, Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (N, C, ...) with at least 2 dims, got {shape}")
    return (0,) + tuple(range(2, x.dim()))


def _channel_shape(x: Tensor) -> Tuple[int, ...]:
    # (C,) statistics broadcast against x as (1, C, 1, ..., 1).
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _values_per_channel(x: Tensor) -> int:
    # n in the n/(n-1) Bessel correction: elements that share one statistic (N for (N, C), N*H*W for images).
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and BIASED variance, each of shape (C,).

    Reduces over dim 0 for (N, C), over (0, 2) for (N, C, L) and over (0, 2, 3) for (N, C, H, W).
    """
    dims = _reduce_dims(x)
    # The population (biased) variance of the batch, which BN normalises with (Ioffe & Szegedy
    # 2015, Alg. 1; F.batch_norm in training mode). Differentiable, so gradients flow through the
    # statistics as in the paper's backward pass. Two passes (mean, then the mean squared
    # deviation), as Dive into Deep Learning writes it: as stable as torch.var_mean's Welford
    # update and, on CPU for (N, C, H, W) inputs, about 2x faster forward and 1.7x with backward.
    mean = x.mean(dim=dims)
    var = (x - mean.reshape(_channel_shape(x))).square().mean(dim=dims)
    return mean, var


def normalize(x: Tensor, mean: Tensor, var: Tensor, gamma: Optional[Tensor] = None,
              beta: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """gamma * (x - mean) / sqrt(var + eps) + beta with (C,) statistics broadcast per channel.

    gamma=None means 1 and beta=None means 0 (no affine transform). Plain tensor ops only.
    """
    eps = _check_eps(eps)
    _reduce_dims(x)
    c = x.shape[1]
    for name, t in (("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (c,)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({c},) to match x's channels, got {got}")
    shape = _channel_shape(x)
    # eps inside the square root, as in Ioffe & Szegedy (2015) and every framework.
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


def ema_update(running: Tensor, batch_value: Tensor, momentum: float) -> Tensor:
    """New running value (1 - momentum) * running + momentum * batch_value (PyTorch convention:
    momentum weights the NEW value; TF's decay = 1 - momentum). Pure: returns a new tensor."""
    m = _check_fraction("momentum", momentum)
    return (1.0 - m) * running + m * batch_value


def batch_norm_scratch(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                       training: bool, momentum: float, eps: float = 1e-5,
                       unbiased_running_var: bool = True
                       ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Batch normalisation from scratch; returns (y, new_running_mean, new_running_var).

    The function of Dive into Deep Learning 7.5, with its pitfalls removed:
    - the mode is the explicit `training` flag, not torch.is_grad_enabled() (D2L's test makes
      evaluation under torch.enable_grad() silently use batch statistics);
    - `momentum` is PyTorch's (weight of the new batch value); D2L's `momentum=0.9` is a decay;
    - the running variance stores the unbiased batch variance (n/(n-1), PyTorch) unless
      unbiased_running_var=False (TF/Keras/Flax store the biased one, as D2L does);
    - running statistics are detached new tensors instead of `.data` views.
    In training mode running_mean/running_var may both be None (statistics not tracked); then the
    returned ones are None too. In evaluation they are required and returned unchanged.
    """
    _check_bool("training", training)
    _check_bool("unbiased_running_var", unbiased_running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        return normalize(x, running_mean, running_var, gamma, beta, eps), running_mean, running_var
    mean, var = batch_stats(x)
    y = normalize(x, mean, var, gamma, beta, eps)
    if running_mean is None:
        return y, None, None
    m = _check_fraction("momentum", momentum)
    n = _values_per_channel(x)
    if unbiased_running_var and n < 2:
        raise ValueError(f"x must have more than 1 value per channel for an unbiased running variance, "
                         f"got shape {tuple(x.shape)}")
    with torch.no_grad():
        # Bessel's correction with n = values per channel, as torch's running_var update.
        stat_var = var * (n / (n - 1)) if unbiased_running_var else var
        new_mean = ema_update(running_mean.detach(), mean.detach(), m)
        new_var = ema_update(running_var.detach(), stat_var.detach(), m)
    return y, new_mean, new_var


# ----------------------------------------------------------------------------- module

class BatchNorm(nn.Module):
    """Batch normalisation over channel dim 1 with switchable running-statistics conventions.

    momentum: PyTorch's (weight of the new batch statistic); None = cumulative moving average
        (effective momentum 1/num_batches_tracked). Use momentum_from_decay for a TF decay.
    running_var: "unbiased" stores var * n/(n-1) in the running average (PyTorch), "biased" the
        biased batch variance (TF/Keras/Flax). Normalisation always uses the biased batch variance.
    track: "var" keeps a running variance; "std" keeps `running_std`, an EMA of the standard
        deviation, and evaluates with var = running_std**2.
    update_stats: False reproduces TensorFlow's forgotten UPDATE_OPS: training normalises with
        batch statistics but never touches the buffers.
    impl: "native" uses torch.nn.functional.batch_norm where possible, "scratch" only the pure
        functions of this module; the two agree to rounding.
    shadow_momenta: extra EMAs of the same batch statistics (buffers shadow_mean and shadow_var or
        shadow_std, shape (K, C)); see use_shadow. They never affect training outputs.
    The mode comes from self.training only; in evaluation, `eval_stats` ("running" or "batch")
    chooses between the running statistics and the batch's own (without touching any buffer).
    Input of dtype float16/bfloat16 is normalised in float32 and the output cast back.
    """

    # Accepted input ranks; None = any rank >= 2 (subclasses narrow it, like torch).
    _valid_dims: Optional[Tuple[int, ...]] = None

    def __init__(self, num_features: int, *, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 affine: bool = True, running_var: str = "unbiased", track: str = "var",
                 update_stats: bool = True, impl: str = "native",
                 shadow_momenta: Sequence[Optional[float]] = ()) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        if isinstance(shadow_momenta, (str, bytes)) or not isinstance(shadow_momenta, _IterableABC):
            raise ValueError(f"shadow_momenta must be a sequence of values in [0, 1] or None, "
                             f"got {shadow_momenta!r}")
        self.num_features = int(num_features)
        self.momentum = _check_fraction("momentum", momentum, allow_none=True)
        self.eps = _check_eps(eps)
        self.affine = _check_bool("affine", affine)
        self.running_var_mode = _check_choice("running_var", running_var, RUNNING_VAR_CHOICES)
        self.track = _check_choice("track", track, TRACK_CHOICES)
        self.update_stats = _check_bool("update_stats", update_stats)
        self.impl = _check_choice("impl", impl, IMPL_CHOICES)
        self.shadow_momenta = tuple(_check_fraction(f"shadow_momenta[{k}]", m, allow_none=True)
                                    for k, m in enumerate(shadow_momenta))
        self._eval_stats = "running"
        self._active_shadow: Optional[int] = None  # set by use_shadow while shadow k is swapped in
        self._shadow_w: Dict[Tuple[torch.dtype, torch.device], Tuple[Tensor, Tensor]] = {}

        c, k = self.num_features, len(self.shadow_momenta)
        if self.affine:
            # Same names and initialisation as torch (gamma = 1, beta = 0), so state_dicts interchange.
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))
        else:
            # D2L exercise 5: gamma and beta fixed at 1 and 0.
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer(self._spread_name, torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if k:
            # Registered only when used, so the default variant's state_dict equals torch's.
            self.register_buffer("shadow_mean", torch.zeros(k, c))
            self.register_buffer(self._shadow_spread_name, torch.ones(k, c))
        self._prime_shadow_weights()

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.double() move the buffers; have the shadow weights ready for the new
        # dtype/device before any forward (a cache miss inside torch.compile means a recompile).
        out = super()._apply(fn, recurse)
        self._prime_shadow_weights()
        return out

    def _prime_shadow_weights(self) -> None:
        if self.shadow_momenta:
            self._shadow_weights(self.running_mean.dtype, self.running_mean.device)

    # -- configuration ----------------------------------------------------------------------

    @property
    def _spread_name(self) -> str:
        return "running_std" if self.track == "std" else "running_var"

    @property
    def _shadow_spread_name(self) -> str:
        return "shadow_std" if self.track == "std" else "shadow_var"

    @property
    def eval_stats(self) -> str:
        """Statistics used in evaluation: "running" (default) or "batch" (the batch's own)."""
        return self._eval_stats

    @eval_stats.setter
    def eval_stats(self, value: str) -> None:
        self._eval_stats = _check_choice("eval_stats", value, EVAL_STATS_CHOICES)

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"eps={self.eps:g}", f"momentum={self.momentum}",
                 f"affine={self.affine}", f"running_var={self.running_var_mode!r}",
                 f"track={self.track!r}", f"update_stats={self.update_stats}", f"impl={self.impl!r}"]
        if self.shadow_momenta:
            parts.append(f"shadow_momenta={self.shadow_momenta}")
        if self._eval_stats != "running":
            parts.append(f"eval_stats={self._eval_stats!r}")
        return ", ".join(parts)

    def reset_running_stats(self) -> None:
        """Running and shadow statistics back to mean 0, var/std 1; num_batches_tracked to 0."""
        with torch.no_grad():
            self.running_mean.zero_()
            getattr(self, self._spread_name).fill_(1.0)
            self.num_batches_tracked.zero_()
            if self.shadow_momenta:
                self.shadow_mean.zero_()
                getattr(self, self._shadow_spread_name).fill_(1.0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def running_stats(self) -> Tuple[Tensor, Tensor]:
        """(running mean, running variance) as evaluation uses them; var = running_std**2 for track="std"."""
        if self.track == "std":
            return self.running_mean, self.running_std.square()
        return self.running_mean, self.running_var

    # -- forward ------------------------------------------------------------------------------

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"input must be a tensor, got {type(x).__name__}")
        dims = self._valid_dims
        if (dims is None and x.dim() < 2) or (dims is not None and x.dim() not in dims):
            allowed = " or ".join(f"{d}D" for d in dims) if dims else "at least 2D"
            raise ValueError(f"input must be {allowed} for {type(self).__name__}, "
                             f"got {x.dim()}D input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"input must have num_features={self.num_features} channels in dim 1, "
                             f"got shape {tuple(x.shape)}")

    def _affine(self, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if not self.affine:
            return None, None
        # .to keeps the autograd link, so half-precision parameters still get gradients.
        return self.weight.to(dtype), self.bias.to(dtype)

    def _native_updates_running(self, x: Tensor) -> bool:
        # PyTorch's own variant: F.batch_norm can update the running buffers in place itself
        # (shadows, if any, are then updated from the batch statistics it returns).
        return (self.impl == "native" and self.running_var_mode == "unbiased" and self.track == "var"
                and self.update_stats
                and self.running_mean.dtype == x.dtype and self.running_var.dtype == x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        out_dtype = x.dtype
        if x.dtype in _HALF_DTYPES:
            x = x.float()
        weight, bias = self._affine(x.dtype)
        n = _values_per_channel(x)

        if self.training:
            if self._active_shadow is not None:
                raise RuntimeError("a BatchNorm inside use_shadow() ran in training mode; use_shadow is "
                                   "for evaluation (its running buffers hold shadow statistics)")
            if n <= 1:
                # As torch: one value per channel has zero variance and no unbiased estimate.
                raise ValueError(f"input must have more than 1 value per channel in training mode, "
                                 f"got shape {tuple(x.shape)}")
            y = self._forward_train(x, weight, bias, n)
        elif self._eval_stats == "batch":
            # "Testing in training mode": the batch's own statistics, buffers untouched.
            # F.batch_norm refuses a single value per channel, so that degenerate case (where
            # every output collapses to beta) goes through the from-scratch path.
            if self.impl == "native" and n > 1:
                y = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            else:
                mean, var = batch_stats(x)
                y = normalize(x, mean, var, weight, bias, self.eps)
        else:
            mean, var = self.running_stats()
            mean, var = mean.to(x.dtype), var.to(x.dtype)
            if self.impl == "native":
                y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
            else:
                y = normalize(x, mean, var, weight, bias, self.eps)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _forward_train(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], n: int) -> Tensor:
        if self._native_updates_running(x):
            # Exactly torch's _BatchNorm.forward: count first, then cumulative factor 1/count.
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            if not self.shadow_momenta:
                return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, factor, self.eps)
            # Same kernel as F.batch_norm on CPU (so the running buffers are bit-identical with and
            # without shadows); it also returns the batch statistics the shadows need.
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, self.running_mean, self.running_var,
                                                      True, factor, self.eps)
            self._update_shadows(mean, self._var_from_invstd(invstd), n)
            return y
        if self.impl == "native":
            if not self.update_stats:
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            # Normalisation by torch; its batch statistics feed our own buffer update, so no second
            # pass over x (a separate var_mean costs more than the normalisation itself on CPU).
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, self.eps)
            self._update_buffers(mean, self._var_from_invstd(invstd), n)
            return y
        mean, var = batch_stats(x)
        y = normalize(x, mean, var, weight, bias, self.eps)
        if self.update_stats:
            self._update_buffers(mean.detach(), var.detach(), n)
        return y

    def _var_from_invstd(self, invstd: Tensor) -> Tensor:
        # native_batch_norm returns invstd = 1/sqrt(var_biased + eps); invert it. Exact to a few
        # ulps of (var + eps), i.e. relative error ~1e-7 * (1 + eps/var) in float32: negligible
        # for running averages except in channels whose variance is far below eps (clamped at 0).
        return (invstd.detach().square().reciprocal() - self.eps).clamp_min(0.0)

    def _batch_stat(self, var_biased: Tensor, n: int) -> Tensor:
        """The batch statistic the running spread averages: the variance, unbiased (Bessel, n
        values per channel, PyTorch) or biased (TF/Keras/Flax), or its square root for track="std"."""
        stat = var_biased * (n / (n - 1)) if self.running_var_mode == "unbiased" else var_biased
        # Tutorial convention for track="std": EMA of the standard deviation itself, not of the variance.
        return stat.sqrt() if self.track == "std" else stat

    @torch.no_grad()
    def _update_buffers(self, mean: Tensor, var_biased: Tensor, n: int) -> None:
        """Running and shadow EMAs from one batch's mean and biased variance (n values per channel)."""
        self.num_batches_tracked.add_(1)
        stat = self._batch_stat(var_biased, n)
        m = self._cumulative() if self.momentum is None else self.momentum
        spread = getattr(self, self._spread_name)
        # Same ema_update as a module with momentum=shadow_momenta[k] that takes this path.
        self.running_mean.copy_(ema_update(self.running_mean.to(mean.dtype), mean, m))
        spread.copy_(ema_update(spread.to(stat.dtype), stat, m))
        if self.shadow_momenta:
            self._update_shadows(mean, var_biased, n, stat)

    def _cumulative(self) -> float:
        # momentum=None: cumulative moving average, factor 1/num_batches_tracked counted after this
        # batch (torch), so the first batch replaces the initial 0/1 entirely. float() of a buffer is
        # a host sync (and a torch.compile graph break): only read where an average needs it.
        return 1.0 / float(self.num_batches_tracked)

    @torch.no_grad()
    def _update_shadows(self, mean: Tensor, var_biased: Tensor, n: int, stat: Optional[Tensor] = None) -> None:
        """Every shadow EMA from one batch (num_batches_tracked already counts it).

        All K shadows with a fixed momentum are updated at once as (K, C) tensors: 4 small kernels
        per statistic whatever K is, instead of 4 per shadow. Elementwise this is ema_update's
        arithmetic ((1 - m) * old + m * new, 1 - m and m rounded to the compute dtype as a Python
        scalar is), so in float32/float64, where BN computes, each row is bit-identical to
        ema_update(row, new, m): to a separate module with momentum m on the ema_update path.
        """
        if stat is None:
            stat = self._batch_stat(var_biased, n)
        spread = getattr(self, self._shadow_spread_name)
        keep, take = self._shadow_weights(mean.dtype, mean.device)
        self.shadow_mean.copy_(keep * self.shadow_mean.to(mean.dtype) + take * mean)
        spread.copy_(keep * spread.to(stat.dtype) + take * stat)
        # Cumulative shadows (momentum None): the vectorised rows above used weights 1 and 0.
        for k, m in enumerate(self.shadow_momenta):
            if m is None:
                c = self._cumulative()
                self.shadow_mean[k].copy_(ema_update(self.shadow_mean[k].to(mean.dtype), mean, c))
                spread[k].copy_(ema_update(spread[k].to(stat.dtype), stat, c))

    def _shadow_weights(self, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
        # (K, 1) columns 1 - m and m, built once per dtype/device: a per-step torch.tensor(list) would
        # be a host-to-device copy (a sync) on CUDA and cannot be captured in a CUDA graph.
        key = (dtype, device)
        w = self._shadow_w.get(key)
        if w is None:
            fixed = [(1.0, 0.0) if m is None else (1.0 - m, m) for m in self.shadow_momenta]
            w = tuple(torch.tensor([[f[i]] for f in fixed], dtype=dtype, device=device) for i in (0, 1))
            self._shadow_w[key] = w
        return w

    # -- shadow swapping (used by use_shadow) ----------------------------------------------------

    def _swap_in_shadow(self, k: int):
        saved = (self._active_shadow, self.running_mean.clone(), getattr(self, self._spread_name).clone())
        with torch.no_grad():
            self.running_mean.copy_(self.shadow_mean[k])
            getattr(self, self._spread_name).copy_(getattr(self, self._shadow_spread_name)[k])
        self._active_shadow = k
        return saved

    def _swap_out_shadow(self, saved) -> None:
        active, mean, spread = saved
        with torch.no_grad():
            self.running_mean.copy_(mean)
            getattr(self, self._spread_name).copy_(spread)
        self._active_shadow = active


class BatchNorm1d(BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) inputs, statistics per feature/channel (like torch.nn.BatchNorm1d)."""
    _valid_dims = (2, 3)


class BatchNorm2d(BatchNorm):
    """BatchNorm over (N, C, H, W) inputs, statistics per channel over (N, H, W) (like torch.nn.BatchNorm2d)."""
    _valid_dims = (4,)


# ----------------------------------------------------------------------------- model helpers

def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (BatchNorm, _BatchNorm))


def _named_bn(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name or "<model>", m) for name, m in model.named_modules() if _is_bn(m)]


def bn_modules(model: nn.Module) -> List[nn.Module]:
    """Every bnlab BatchNorm and torch.nn BatchNorm (_BatchNorm) module of `model`, in module order."""
    return [m for _, m in _named_bn(model)]


def _running_mean_var(name: str, m: nn.Module) -> Tuple[Tensor, Tensor]:
    if isinstance(m, BatchNorm):
        return m.running_stats()
    if m.running_mean is None or m.running_var is None:
        raise ValueError(f"model's BatchNorm {name!r} has track_running_stats=False: no running statistics")
    return m.running_mean, m.running_var


def set_update_stats(model: nn.Module, flag: bool) -> None:
    """Set update_stats on every bnlab BatchNorm of `model` (False = TensorFlow's missing update ops)."""
    _check_bool("flag", flag)
    named = _named_bn(model)
    foreign = [name for name, m in named if not isinstance(m, BatchNorm)]
    if foreign:
        raise ValueError(f"model must contain only bnlab BatchNorm modules for set_update_stats, "
                         f"got torch BatchNorm at {foreign}")
    for _, m in named:
        m.update_stats = flag


def _batch_stats_hook(module: nn.Module, args, output):
    # Forward hook for torch BatchNorm: in evaluation replace its output by batch-statistics
    # normalisation (never passes buffers, so nothing is updated).
    if module.training:
        return None
    x = args[0]
    xc = x.float() if x.dtype in _HALF_DTYPES else x
    w = None if module.weight is None else module.weight.to(xc.dtype)
    b = None if module.bias is None else module.bias.to(xc.dtype)
    mean, var = batch_stats(xc)
    return normalize(xc, mean, var, w, b, module.eps).to(x.dtype)


@contextlib.contextmanager
def batch_stats_eval(model: nn.Module) -> Iterator[nn.Module]:
    """For the duration, every BN of `model` evaluates with the batch's own statistics.

    bnlab modules get eval_stats="batch" (previous value restored on exit, even on exception);
    torch BatchNorm modules get a temporary forward hook. No buffer changes in evaluation. Training
    mode inside the context behaves as usual.
    """
    named = _named_bn(model)
    saved: List[Tuple[BatchNorm, str]] = []
    hooks = []
    try:
        for _, m in named:
            if isinstance(m, BatchNorm):
                saved.append((m, m.eval_stats))
                m.eval_stats = "batch"
            else:
                hooks.append(m.register_forward_hook(_batch_stats_hook))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for m, value in reversed(saved):
            m.eval_stats = value


@contextlib.contextmanager
def use_shadow(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """For the duration, every BN of `model` holds shadow statistics k in its running buffers,
    so evaluation uses them (and running_stats_error etc. see them).

    The running buffers are copied aside, overwritten with shadow k and restored bit-exactly on
    exit, even on exception. Every BN must be a bnlab BatchNorm with more than k shadow momenta.
    Training inside the context raises RuntimeError (the update would go to the swapped buffers).
    """
    named = _named_bn(model)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not named:
        raise ValueError("model must contain BatchNorm modules with shadow_momenta, found none")
    lacking = [name for name, m in named if not isinstance(m, BatchNorm) or len(m.shadow_momenta) <= k]
    if lacking:
        raise ValueError(f"k must be < the number of shadow_momenta of every BatchNorm, got k={k}; "
                         f"modules without shadow {k}: {lacking}")
    swapped: List[Tuple[BatchNorm, tuple]] = []
    try:
        for _, m in named:
            swapped.append((m, m._swap_in_shadow(int(k))))
        yield model
    finally:
        # Reverse order, so a module listed twice (shared) gets its original buffers back.
        for m, saved in reversed(swapped):
            m._swap_out_shadow(saved)


class _ChannelMoments:
    """Exact per-channel count, mean and sum of squared deviations (M2) over every value seen,
    merged batch by batch with the pairwise update of Chan, Golub & LeVeque (1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        dims = _reduce_dims(x)
        # Accumulate in float64 (MPS has none): M2 of many batches is a long sum.
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        xd = x.detach().to(acc)
        n_b = _values_per_channel(xd)
        if n_b == 0:
            return
        mean_b = xd.mean(dims)
        m2_b = (xd - mean_b.reshape(_channel_shape(xd))).square().sum(dims)
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        # Law of total variance in merge form: M2 = M2_a + M2_b + delta^2 * n_a * n_b / n; equals
        # sum over batches of n_b * (biased var_b + mean_b^2) - n * mean^2 without its cancellation.
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n


def _calibration_inputs(batches: Iterable, num_samples: int) -> Iterator[Tensor]:
    """Inputs x from `batches` (tensor or (x, y, ...) items), the last one truncated so that exactly
    num_samples examples come out; stops pulling items once num_samples are reached."""
    seen = 0
    for item in batches:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"batches must yield tensors or (x, y) tuples with a batch dim, "
                             f"got {type(x).__name__}")
        need = num_samples - seen
        if x.shape[0] > need:
            x = x[:need]
        if x.shape[0] == 0:
            continue
        seen += x.shape[0]
        yield x
        if seen >= num_samples:
            return


def _merge_singletons(inputs: Iterator[Tensor]) -> Iterator[Tensor]:
    # A training-mode forward of one example fails on dense BN (one value per channel), so a
    # batch of one is joined to its neighbour; every example is still seen exactly once.
    pending: Optional[Tensor] = None
    for x in inputs:
        if pending is not None and (x.shape[0] == 1 or pending.shape[0] == 1):
            pending = torch.cat([pending, x])
            continue
        if pending is not None:
            yield pending
        pending = x
    if pending is not None:
        yield pending


def precise_bn(model: nn.Module, batches: Iterable, num_samples: int, *, inplace: bool = False) -> nn.Module:
    """Precise-BN: replace every BN's running statistics by the exact population statistics of its
    inputs over num_samples training examples.

    Sources: "BN: the untold story" (Method TWO); Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm", sec. 3; fvcore.nn.precise_bn (which averages per-batch statistics with equal weights;
    here every value is weighted equally, i.e. batches by their size).
    With weights frozen (torch.no_grad) the model runs in train mode over `batches` (items: x or
    (x, y)); the last batch is truncated to reach exactly num_samples (a batch of one example is
    joined to its neighbour, since dense BN cannot run on one example in train mode). Each BN's
    inputs are collected by a forward pre-hook; then running_mean = mean of all values per channel
    and running var = their exact variance (law of total variance), divided by count - 1 where the
    BN stores unbiased variances (torch BN, running_var="unbiased") and by count otherwise; track="std"
    stores its square root. All other BN buffers (num_batches_tracked, shadows) keep their values.
    Works on a deep copy unless inplace=True (the input model is then untouched); returns the model
    in eval mode. If `batches` runs out early, what was seen is used.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    _check_bool("inplace", inplace)
    target = model if inplace else copy.deepcopy(model)
    named = _named_bn(target)
    if not named:
        raise ValueError("model must contain at least one BatchNorm module, found none")
    for name, m in named:
        _running_mean_var(name, m)  # raises for torch BN without running statistics

    moments = [_ChannelMoments() for _ in named]
    # Every BN buffer is restored after the calibration passes; only the running mean/var(std) change.
    saved_buffers = [{b: t.clone() for b, t in m.named_buffers(recurse=False)} for _, m in named]
    saved_modes = [(m, m.training) for m in target.modules()]

    def make_hook(acc: _ChannelMoments):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            acc.add(x)
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(acc), with_kwargs=True)
             for (_, m), acc in zip(named, moments)]
    seen = 0
    ok = False
    try:
        target.train()
        with torch.no_grad():
            for x in _merge_singletons(_calibration_inputs(batches, num_samples)):
                if x.shape[0] < 2:
                    raise ValueError(f"batches must give at least 2 examples, got {x.shape[0]}")
                target(x)
                seen += x.shape[0]
        if seen == 0:
            raise ValueError("batches must give at least one example, got none")
        ok = True
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for (_, m), buffers in zip(named, saved_buffers):
                for b, t in buffers.items():
                    getattr(m, b).copy_(t)
        if not ok:
            for m, mode in saved_modes:
                m.training = mode

    with torch.no_grad():
        for (name, m), acc in zip(named, moments):
            if acc.count < 2:
                warnings.warn(f"precise_bn: BatchNorm {name!r} saw {acc.count} values per channel; "
                              f"its running statistics are left unchanged", RuntimeWarning, stacklevel=2)
                continue
            unbiased = m.running_var_mode == "unbiased" if isinstance(m, BatchNorm) else True
            var = acc.m2 / (acc.count - 1 if unbiased else acc.count)
            m.running_mean.copy_(acc.mean)
            if isinstance(m, BatchNorm) and m.track == "std":
                m.running_std.copy_(var.sqrt())
            else:
                m.running_var.copy_(var)
    target.eval()
    return target


def running_stats_error(model: nn.Module, reference_model: nn.Module) -> Dict[str, float]:
    """Relative distance of each BN's running statistics from a reference (e.g. the precise-BN copy).

    BN modules are paired in module order (both models need the same number). For layer l,
    mean_err_l = ||rm_l - rm_ref_l||_2 / (||rm_ref_l||_2 + 1e-12) and likewise var_err_l with the
    running variances (running_std**2 for track="std"; stored values as they are, whatever the
    biased/unbiased convention). Returns {"mean_err": mean over layers, "var_err": mean over layers}.
    """
    a, b = _named_bn(model), _named_bn(reference_model)
    if not a or len(a) != len(b):
        raise ValueError(f"model and reference_model must have the same number (>= 1) of BatchNorm "
                         f"modules, got {len(a)} and {len(b)}")
    mean_errs, var_errs = [], []
    for (na, ma), (nb, mb) in zip(a, b):
        mean, var = _running_mean_var(na, ma)
        mean_ref, var_ref = _running_mean_var(nb, mb)
        if mean.shape != mean_ref.shape:
            raise ValueError(f"reference_model's BatchNorm {nb!r} has {mean_ref.numel()} channels, "
                             f"model's {na!r} has {mean.numel()}")

        def rel(v: Tensor, ref: Tensor) -> float:
            # On CPU in float64: tiny (C,) vectors, and MPS has no float64.
            v, ref = v.detach().cpu().double(), ref.detach().cpu().double()
            return (torch.linalg.vector_norm(v - ref) / (torch.linalg.vector_norm(ref) + 1e-12)).item()

        mean_errs.append(rel(mean, mean_ref))
        var_errs.append(rel(var, var_ref))
    return {"mean_err": sum(mean_errs) / len(mean_errs), "var_err": sum(var_errs) / len(var_errs)}

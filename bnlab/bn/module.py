"""The BatchNorm module: PyTorch and TensorFlow running-statistics conventions, shadow EMAs,
batch-statistics evaluation, half-precision inputs normalised in float32."""
from __future__ import annotations

import numbers
from collections.abc import Iterable as _IterableABC
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.bn.functional import (
    EVAL_STATS_CHOICES, IMPL_CHOICES, RUNNING_VAR_CHOICES, TRACK_CHOICES, _HALF_DTYPES, _check_bool,
    _check_choice, _check_eps, _check_fraction, _values_per_channel, batch_stats, ema_update,
    momentum_from_decay, normalize,
)
from bnlab.bn.ghost import check_ghost_batch_size, ghost_chunks

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
    ghost_batch_size: ghost batch normalisation (Hoffer, Hubara & Soudry 2017): in training each
        batch is cut into consecutive chunks of this many examples (bn.ghost.ghost_chunks) and
        each chunk is normalised with its own statistics, exactly as if the module ran on each
        chunk in turn: the running (and shadow) averages take one update per chunk, in order, and
        num_batches_tracked counts chunks. Evaluation with eval_stats="batch" uses the same
        chunks (the statistics a test in training mode would see); running-statistics
        evaluation and precise BN do not depend on it. None = the whole batch.
    frozen: set by bn.freeze (FrozenBN, Wu & Johnson 2021): training mode then normalises with
        the running statistics, which no longer change (no buffer is updated).
    The mode comes from self.training only; in evaluation, `eval_stats` ("running" or "batch")
    chooses between the running statistics and the batch's own (without touching any buffer).
    Input of dtype float16/bfloat16 is normalised in float32 and the output cast back.
    """

    # Accepted input ranks; None = any rank >= 2 (subclasses narrow it, like torch).
    _valid_dims: Optional[Tuple[int, ...]] = None

    def __init__(self, num_features: int, *, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 affine: bool = True, running_var: str = "unbiased", track: str = "var",
                 update_stats: bool = True, impl: str = "native",
                 shadow_momenta: Sequence[Optional[float]] = (),
                 ghost_batch_size: Optional[int] = None) -> None:
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
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.frozen = False  # FrozenBN: see bn.freeze
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
        if self.ghost_batch_size is not None:
            parts.append(f"ghost_batch_size={self.ghost_batch_size}")
        if self.frozen:
            parts.append("frozen=True")
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
            if self.frozen:
                # FrozenBN: fixed population statistics in training too; nothing is updated.
                y = self._normalize_running(x, weight, bias)
            elif self.ghost_batch_size is not None and x.shape[0] > self.ghost_batch_size:
                # One ordinary BN training step per ghost batch, in order (see the class docstring).
                y = torch.cat([self._forward_train(c, weight, bias, _values_per_channel(c))
                               for c in ghost_chunks(x, self.ghost_batch_size)])
            else:
                y = self._forward_train(x, weight, bias, n)
        elif self._eval_stats == "batch":
            # "Testing in training mode": the batch's own statistics (per ghost batch, if any),
            # buffers untouched.
            g = self.ghost_batch_size
            if g is not None and x.shape[0] > g:
                y = torch.cat([self._batch_stats_output(c, weight, bias) for c in ghost_chunks(x, g)])
            else:
                y = self._batch_stats_output(x, weight, bias)
        else:
            y = self._normalize_running(x, weight, bias)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _batch_stats_output(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        # F.batch_norm refuses a single value per channel, so that degenerate case (where every
        # output collapses to beta) goes through the from-scratch path.
        if self.impl == "native" and _values_per_channel(x) > 1:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        mean, var = batch_stats(x)
        return normalize(x, mean, var, weight, bias, self.eps)

    def _normalize_running(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        mean, var = self.running_stats()
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        if self.impl == "native":
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        return normalize(x, mean, var, weight, bias, self.eps)

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

"""The typed configuration schema: every field, its unit and convention, and its checks.

Hydra validates types and enum values when it composes; `__post_init__` checks ranges and
cross-field rules when cli.py calls `OmegaConf.to_object` (once). Nothing below cli.py sees a DictConfig.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and what is allowed."""


def _fail(key: str, allowed: str, got: Any) -> None:
    raise ConfigError(f"{key} must be {allowed}, got {got!r}")


class DataName(str, Enum):
    fashion_mnist = "fashion_mnist"
    synthetic = "synthetic"
    cifar10 = "cifar10"  # the CIFAR-10 python tarball (cifar-10-python.tar.gz)
    tensors = "tensors"  # a user's own .pt/.npz file (data.path)


class ModelName(str, Enum):
    lenet = "lenet"
    mlp = "mlp"
    resnet20 = "resnet20"  # CIFAR-style ResNet-20 (He et al. 2016, sec. 4.2)
    custom = "custom"  # any importable nn.Module class or factory (model.target)


class Activation(str, Enum):
    sigmoid = "sigmoid"
    relu = "relu"


class Pool(str, Enum):
    avg = "avg"  # average pooling (Dive into Deep Learning 7.5, PyTorch edition)
    max = "max"  # max pooling (the MXNet edition of the book, seed 004)


class Placement(str, Enum):
    before_act = "before_act"  # conv/linear -> BN -> activation (Ioffe & Szegedy; d2l 7.5)
    after_act = "after_act"  # conv/linear -> activation -> BN
    none = "none"  # no BN at all: the baseline


class RunningVar(str, Enum):
    unbiased = "unbiased"  # PyTorch stores var * n / (n - 1)
    biased = "biased"  # TF/Keras/Flax store the batch variance as normalised with


class Track(str, Enum):
    var = "var"  # exponential average of the variance (every framework)
    std = "std"  # exponential average of the standard deviation (the tutorial seed's variant)


class Impl(str, Enum):
    native = "native"  # torch.nn.functional.batch_norm where the variant allows
    scratch = "scratch"  # plain tensor ops, as Dive into Deep Learning writes it


class Schedule(str, Enum):
    constant = "constant"  # optim.lr throughout (after the warm-up, if any)
    step = "step"  # optim.lr x optim.gamma ** (number of optim.milestones passed)
    cosine = "cosine"  # half a cosine from optim.lr (end of warm-up) to 0 (end of training)


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class DataConfig:
    # Which dataset: the real Fashion-MNIST, CIFAR-10, a user's own tensors file (data.path), or a
    # small deterministic synthetic image set for tests.
    name: DataName = DataName.fashion_mnist
    # Folder holding the dataset's files (the four Fashion-MNIST IDX .gz files, or
    # cifar-10-python.tar.gz); null = $BNLAB_DATA, then (Fashion-MNIST) Debian's
    # /usr/share/datasets/fashion-mnist, then the cache <project>/runs/data/, downloading into it
    # (checksum verified) where a network is reachable.
    root: Optional[str] = None
    # data=tensors only: a .pt (torch.save of a dict) or .npz file holding x_train (N, C, H, W) or
    # (N, D) floats, y_train (N,) integer labels 0..K-1, x_val, y_val.
    path: Optional[str] = None
    # Training mini-batch size (examples). The last partial training batch is dropped.
    batch_size: int = 256
    # Batch size (examples) of the evaluation passes with running statistics; does not change results.
    eval_batch_size: int = 2000
    # Use only the first N training examples (a fixed random subset chosen by `subset_seed`); null = all.
    train_subset: Optional[int] = None
    # Use only the first N validation examples (fixed random subset); null = all.
    val_subset: Optional[int] = None
    # Seed of the fixed subsets, so every run of a study sees the same examples.
    subset_seed: int = 0
    # Synthetic data only: training set size (examples).
    synthetic_train: int = 2048
    # Synthetic data only: validation set size (examples).
    synthetic_val: int = 512
    # Synthetic data only: the shape of one example, e.g. [3, 32, 32]; null = the shape the model
    # needs (1x28x28 for lenet/mlp, 3x32x32 for resnet20 and custom models).
    synthetic_shape: Optional[List[int]] = None

    def __post_init__(self) -> None:
        # Files by absolute path (a relative one is relative to the working directory): the run's
        # record then names them, and load_run / bnlab-diagnose find them, from any folder.
        for key in ("root", "path"):
            v = getattr(self, key)
            if v:
                setattr(self, key, str(Path(v).expanduser().resolve()))
        if self.batch_size < 1:
            _fail("data.batch_size", ">= 1", self.batch_size)
        if self.eval_batch_size < 1:
            _fail("data.eval_batch_size", ">= 1", self.eval_batch_size)
        for key in ("train_subset", "val_subset"):
            v = getattr(self, key)
            if v is not None and v < 1:
                _fail(f"data.{key}", ">= 1 or null", v)
        for key in ("synthetic_train", "synthetic_val"):
            if getattr(self, key) < 1:
                _fail(f"data.{key}", ">= 1", getattr(self, key))
        if self.synthetic_shape is not None and (
                not 1 <= len(self.synthetic_shape) <= 3 or any(d < 1 for d in self.synthetic_shape)):
            _fail("data.synthetic_shape", "null or a list of 1 to 3 positive sizes such as [3, 32, 32]",
                  list(self.synthetic_shape))
        if self.name == DataName.tensors and not self.path:
            _fail("data.path", "a .pt or .npz file with x_train, y_train, x_val, y_val when data=tensors",
                  self.path)


@dataclass
class ModelConfig:
    # Architecture (registry in bnlab/models.py): LeNet-5 as in Dive into Deep Learning 7.5 (avg
    # pooling), a 2-hidden-layer MLP, ResNet-20 for 32x32 images, or custom (model.target).
    name: ModelName = ModelName.lenet
    # LeNet only: the 2x2 pooling after each convolution block, avg (the book's PyTorch edition)
    # or max (its MXNet edition, the network of seed 004).
    pool: Pool = Pool.avg
    # Non-linearity after every hidden layer.
    activation: Activation = Activation.sigmoid
    # MLP only: widths of the hidden layers.
    hidden: List[int] = field(default_factory=lambda: [256, 128])
    # model=custom only: "package.module:factory", an importable nn.Module class or a function
    # returning an nn.Module (the working directory is on the import path). Its BN layers are
    # converted to bnlab's BatchNorm with the bn.* options (bnlab.convert_bn).
    target: Optional[str] = None
    # model=custom only: keyword arguments of the factory, e.g. {num_classes: 10}.
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            _fail("model.hidden", "a non-empty list of positive widths", self.hidden)
        if self.name == ModelName.custom and (not self.target or ":" not in self.target):
            _fail("model.target", "'package.module:factory' when model=custom", self.target)


DEFAULT_MOMENTUM = 0.1


@dataclass
class BNConfig:
    # Where BN sits relative to the activation, or none (no BN anywhere).
    placement: Placement = Placement.before_act
    # PyTorch convention: weight of the NEW batch statistic in the running average, in [0, 1];
    # null = cumulative average over all batches. 0 = statistics never move (stay at 0 / 1).
    momentum: Optional[float] = DEFAULT_MOMENTUM
    # TF/Keras/MXNet convention, an alternative to momentum: weight of the OLD value = 1 - momentum.
    # Setting both is an error; when set, bnlab uses momentum = 1 - decay (bn.momentum_from_decay).
    decay: Optional[float] = None
    # false reproduces TensorFlow's missing update ops: running statistics keep their initial values.
    update_stats: bool = True
    # Added to the variance before the square root (numerical safety), as in every framework.
    eps: float = 1e-5
    # How the running variance is stored: unbiased (PyTorch) or biased (TF/Keras/Flax).
    running_var: RunningVar = RunningVar.unbiased
    # Average the variance (all frameworks) or the standard deviation (the tutorial seed).
    track: Track = Track.var
    # Learn gamma and beta (true) or fix them at 1 and 0 (d2l 7.5 exercise 5).
    affine: bool = True
    # Implementation: native (F.batch_norm) or from scratch (plain tensor ops).
    impl: Impl = Impl.native
    # Training examples used for precise-BN recalibration each epoch (val/acc_precise_bn); 0 = skip.
    precise_samples: int = 10000
    # Extra running averages with these momenta (PyTorch convention), updated from the same batch
    # statistics; each epoch logs val/acc_shadow/<momentum> (and, with precise BN, the distance of
    # each shadow average to the population statistics, bnstats/{mean,var}_err_shadow/<momentum>).
    # Training itself is unchanged.
    shadow_momenta: List[float] = field(default_factory=list)
    # Precise BN with each of these calibration sizes (examples, each >= 2), at the last epoch
    # only: val/acc_precise_bn/<n>, one fresh draw of training batches per size. [] = none.
    precise_sizes: List[int] = field(default_factory=list)
    # Ghost batch normalisation (Hoffer et al. 2017): BN statistics over consecutive sub-batches of
    # this many examples inside each SGD batch (which is unchanged); must divide data.batch_size.
    # The running averages take one update per ghost batch; val/acc_batch_stats normalises
    # validation batches per ghost batch too; precise BN and running statistics ignore it.
    # null = the whole SGD batch.
    ghost_batch_size: Optional[int] = None
    # FrozenBN (Wu & Johnson 2021): from the start of this epoch (1-based) on, every BN normalises
    # with fixed population statistics, recomputed once by precise BN (bn.precise_samples
    # examples) at that point, in training too; running statistics stop changing. null = never.
    freeze_at: Optional[int] = None

    def __post_init__(self) -> None:
        if self.decay is not None:
            if not 0.0 <= self.decay <= 1.0:
                _fail("bn.decay", "in [0, 1] or null", self.decay)
            # The schema cannot tell a default momentum from one the user typed; cli.py rejects
            # both keys overridden together, and here a momentum other than the default is a conflict.
            if self.momentum is not None and self.momentum != DEFAULT_MOMENTUM:
                raise ConfigError("set bn.momentum or bn.decay, not both")
            if self.momentum is None:
                raise ConfigError("set bn.momentum or bn.decay, not both")
            from bnlab.bn import momentum_from_decay

            self.momentum = momentum_from_decay(self.decay)
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            _fail("bn.momentum", "in [0, 1] or null", self.momentum)
        if not self.eps > 0:
            _fail("bn.eps", "> 0", self.eps)
        if self.precise_samples < 0:
            _fail("bn.precise_samples", ">= 0", self.precise_samples)
        for m in self.shadow_momenta:
            if not 0.0 <= m <= 1.0:
                _fail("bn.shadow_momenta", "a list of values in [0, 1]", list(self.shadow_momenta))
        if any(n < 2 for n in self.precise_sizes):
            _fail("bn.precise_sizes", "a list of sample counts >= 2", list(self.precise_sizes))
        if self.ghost_batch_size is not None and self.ghost_batch_size < 2:
            _fail("bn.ghost_batch_size", ">= 2 or null", self.ghost_batch_size)
        if self.freeze_at is not None and self.freeze_at < 1:
            _fail("bn.freeze_at", "an epoch >= 1 or null", self.freeze_at)

    @property
    def enabled(self) -> bool:
        return self.placement != Placement.none

    def layer_settings_changed(self) -> List[str]:
        """bn.<field> of the LAYER_FIELDS that differ from their default: options that only a
        model with BN layers can apply."""
        d = BNConfig()
        return [f"bn.{f}" for f in LAYER_FIELDS if getattr(self, f) != getattr(d, f)]


# bn.* fields that configure each BN layer (bnlab.models.bn_kwargs) or freeze them (FrozenBN); the
# others (placement, precise_samples, precise_sizes) act on the model or its evaluation.
LAYER_FIELDS = ("decay", "momentum", "update_stats", "eps", "running_var", "track", "affine", "impl",
                "shadow_momenta", "ghost_batch_size", "freeze_at")


@dataclass
class OptimConfig:
    # SGD learning rate (d2l 7.5 uses 1.0 with BN).
    lr: float = 1.0
    # SGD (heavy-ball) momentum; unrelated to BN momentum.
    momentum: float = 0.0
    # L2 penalty coefficient.
    weight_decay: float = 0.0
    # Learning-rate schedule, set before every SGD step from t = steps done / steps per epoch
    # (epochs, fractional): constant, step or cosine (see Schedule); logged as train/lr, step/lr.
    schedule: Schedule = Schedule.constant
    # Linear warm-up over this many epochs (fractional allowed): lr x (steps done + 1) / warm-up
    # steps, then the schedule. 0 = none.
    warmup_epochs: float = 0.0
    # step schedule: epochs (increasing, >= 1) after which the rate is multiplied by gamma
    # (milestone 5 = from the first step of the 6th epoch on).
    milestones: List[int] = field(default_factory=list)
    # step schedule: the factor applied at each milestone, in (0, 1].
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0:
            _fail("optim.lr", "> 0", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            _fail("optim.momentum", "in [0, 1)", self.momentum)
        if self.weight_decay < 0:
            _fail("optim.weight_decay", ">= 0", self.weight_decay)
        if not self.warmup_epochs >= 0:
            _fail("optim.warmup_epochs", ">= 0", self.warmup_epochs)
        ms = list(self.milestones)
        if any(m < 1 for m in ms) or ms != sorted(set(ms)):
            _fail("optim.milestones", "strictly increasing epochs >= 1", ms)
        if not 0.0 < self.gamma <= 1.0:
            _fail("optim.gamma", "in (0, 1]", self.gamma)


# Divergence rule (train.py stops and tags a run, the report leaves it out of the means like a NaN
# run): an epoch's mean training cross-entropy that is NaN/inf or above this bound, in nats per
# example. Chance level over 10 classes is ln 10 = 2.3; a mean loss of 100 means logits confidently
# wrong by margins of about 100, which no learning run shows; an exploding but finite loss (the
# sigmoid LeNet at lr 1e6: about 7e6) is thus a divergence. A constant, not a field: a new field
# would change every config hash, and resume would retrain every stored run.
DIVERGED_LOSS = 100.0


@dataclass
class TrainConfig:
    # Number of passes over the training set.
    epochs: int = 10
    # auto = cuda when available, else cpu.
    device: Device = Device.auto
    # CPU threads for torch (intra-op); null = the CPUs free to this process at the start of the
    # run (affinity, cgroup quota, other processes' load: bnlab/threads.py).
    threads: Optional[int] = None
    # Validation examples evaluated one at a time in training mode at the last epoch
    # (val/acc_batch_stats_bs1: the batch-size-1 collapse); 0 = skip.
    bs1_samples: int = 500
    # Show a progress bar (only on a terminal; a line per epoch otherwise).
    progress: bool = True
    # torch.compile the training forward + loss (inductor; needs a C++ compiler on CPU, Triton on
    # CUDA). Same maths, different rounding; evaluation stays eager. First epoch pays the compile.
    compile: bool = False
    # Mixed precision: the training forward autocast to bfloat16; BN statistics, normalisation
    # and the loss stay float32. Evaluation runs in float32.
    amp: bool = False
    # CUDA only (ignored on CPU): capture the whole training step (forward, backward, SGD update)
    # as one CUDA graph after 3 eager warm-up steps; needs fixed BN momenta (no null).
    cuda_graphs: bool = False
    # Step-level evaluation every this many SGD steps (0 = none, only the per-epoch one): val/acc
    # with running, batch and precise statistics (and shadows) logged under step/<metric> with
    # MLflow step = global SGD step (epoch metrics keep step = epoch and no prefix), plus step/lr.
    eval_every: int = 0
    # Step-level evaluation on this many validation examples (a fixed random subset, seed
    # data.subset_seed) to keep it cheap; null = the whole validation set.
    eval_subset: Optional[int] = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            _fail("train.epochs", ">= 1", self.epochs)
        if self.threads is not None and self.threads < 1:
            _fail("train.threads", ">= 1 or null", self.threads)
        if self.bs1_samples < 0:
            _fail("train.bs1_samples", ">= 0", self.bs1_samples)
        if self.eval_every < 0:
            _fail("train.eval_every", ">= 0 (steps; 0 = once per epoch only)", self.eval_every)
        if self.eval_subset is not None and self.eval_subset < 1:
            _fail("train.eval_subset", ">= 1 or null", self.eval_subset)


@dataclass
class TrackingConfig:
    # MLflow tracking URI; null = the project's SQLite store (<project>/runs/mlflow.db), whatever the
    # working directory. Use http://127.0.0.1:PORT (bnlab-ui) for many parallel workers or clusters.
    uri: Optional[str] = None
    # MLflow experiment; a study sets it to the study's name.
    experiment: str = "bnlab"
    # The study this run belongs to (set by bnlab/conf/study/*.yaml); null for a single run.
    study: Optional[str] = None
    # Relaunching skips a job whose config hash already has a FINISHED run in the experiment.
    resume: bool = True

    def __post_init__(self) -> None:
        if not self.experiment:
            _fail("tracking.experiment", "a non-empty name", self.experiment)


@dataclass
class Config:
    # Seed of weights, batch order and precise-BN batches (torch.manual_seed).
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bn: BNConfig = field(default_factory=BNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # inf and nan pass every range check written as a comparison (nan < 0 is false): refuse
        # them everywhere, whatever the field (optim.lr=inf, optim.weight_decay=nan, bn.eps=inf).
        for key, v in flatten(to_plain(self)).items():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, float) and not math.isfinite(x):
                    _fail(key, "a finite number", x)
        # Cross-field: a BN training batch of one example normalises every output to beta.
        if self.bn.enabled and self.data.batch_size < 2:
            _fail("data.batch_size", ">= 2 when BN is used (bn.placement != none)", self.data.batch_size)
        # A user's model keeps the BN placement its own code chose; bnlab only converts its BN layers.
        if self.model.name == ModelName.custom and self.bn.placement != Placement.before_act:
            _fail("bn.placement", "before_act with model=custom (its own code places BN; "
                  "bnlab converts its BN layers)", self.bn.placement.value)
        changed = self.bn.layer_settings_changed()
        if not self.bn.enabled and changed:
            _fail(changed[0], "left at its default with bn.placement=none (no BN layer to apply it to)",
                  getattr(self.bn, changed[0][3:]))
        g = self.bn.ghost_batch_size
        if g is not None and self.data.batch_size % g:
            _fail("bn.ghost_batch_size", f"a divisor of data.batch_size={self.data.batch_size} (>= 2) or null", g)
        if self.bn.freeze_at is not None:
            if self.bn.freeze_at > self.train.epochs:
                _fail("bn.freeze_at", f"an epoch in [1, train.epochs={self.train.epochs}] or null", self.bn.freeze_at)
            if self.bn.precise_samples < 2:
                _fail("bn.precise_samples", ">= 2 when bn.freeze_at is set (FrozenBN recomputes the statistics)",
                      self.bn.precise_samples)
        if self.optim.warmup_epochs >= self.train.epochs:
            _fail("optim.warmup_epochs", f"< train.epochs={self.train.epochs}", self.optim.warmup_epochs)
        if any(m >= self.train.epochs for m in self.optim.milestones):
            _fail("optim.milestones", f"epochs < train.epochs={self.train.epochs}", list(self.optim.milestones))
        if self.train.cuda_graphs and (self.optim.schedule != Schedule.constant or self.optim.warmup_epochs
                                       or self.bn.freeze_at is not None):
            raise ConfigError("train.cuda_graphs needs optim.schedule=constant, no optim.warmup_epochs and "
                              "bn.freeze_at=null (a captured step keeps its learning rate and BN mode)")


def to_plain(cfg: Config) -> dict:
    """The config as plain JSON-able values (enums as their string values)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(asdict(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'bn': {'momentum': 0.1}} -> {'bn.momentum': 0.1}: MLflow params and frame columns."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (train.yaml lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)

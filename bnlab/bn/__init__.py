"""Batch Normalization for bnlab, one concept per file:

- functional.py: the maths as pure functions (batch statistics, normalisation, EMA, conventions);
- module.py: the BatchNorm module (PyTorch and TensorFlow conventions, shadow averages);
- modes.py: whole-model helpers (find BN layers, switch updates, batch-statistics/shadow evaluation);
- precise.py: precise-BN recalibration and the distance of running to population statistics;
- convert.py: convert_bn, any model's BN layers to bnlab's BatchNorm (or back to torch's);
- diagnose.py: diagnose, a trained model's BN statistics judged without training it.
- ghost.py: ghost batch normalisation (the chunks a batch is normalised in);
- frozen.py: FrozenBN (fixed population statistics in training too).

`from bnlab import bn; bn.BatchNorm2d(...)` keeps working: every public name is re-exported here.
"""
from bnlab.bn.functional import (
    batch_norm_scratch, batch_stats, decay_from_momentum, ema_update, momentum_from_decay, normalize,
)
from bnlab.bn.modes import batch_stats_eval, bn_modules, set_update_stats, use_shadow
from bnlab.bn.module import BatchNorm, BatchNorm1d, BatchNorm2d
from bnlab.bn.precise import precise_bn, running_stats_error
from bnlab.bn.convert import convert_bn
from bnlab.bn.diagnose import Diagnosis, diagnose
from bnlab.bn.ghost import ghost_chunks
from bnlab.bn.frozen import freeze, is_frozen, unfreeze

__all__ = [
    "momentum_from_decay", "decay_from_momentum", "batch_stats", "normalize", "ema_update",
    "batch_norm_scratch", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "bn_modules",
    "batch_stats_eval", "use_shadow", "precise_bn", "running_stats_error", "set_update_stats",
    "convert_bn", "diagnose", "Diagnosis",
    "ghost_chunks", "freeze", "unfreeze", "is_frozen",
]

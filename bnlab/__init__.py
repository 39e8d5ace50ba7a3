"""bnlab: a research harness for Batch Normalization (momentum, batch size, learning rate,
placement, missing update ops, precise BN) with Hydra sweeps, MLflow runs and report figures."""

__version__ = "0.1.0"

# OpenMP reads its wait policy once, when torch loads it: idle workers that spin steal the CPU
# from every other process on a shared machine (bnlab.threads). A policy the user set wins.
from bnlab.threads import quiet_waits as _quiet_waits  # noqa: E402 - stdlib only, no torch

_quiet_waits()

# Importing bnlab stays cheap (no torch, no MLflow): these load on first use.
_LAZY = {"convert_bn": "bnlab.bn.convert", "diagnose": "bnlab.bn.diagnose", "load_run": "bnlab.load"}
__all__ = ["convert_bn", "diagnose", "load_run", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")

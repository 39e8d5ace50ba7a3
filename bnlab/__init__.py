"""bnlab: a research harness for Batch Normalization (momentum, batch size, learning rate,
placement, missing update ops, precise BN) with Hydra sweeps, MLflow runs and report figures."""

__version__ = "0.1.0"

# Importing bnlab stays cheap (no torch, no MLflow): these load on first use.
_LAZY = {"convert_bn": "bnlab.bn.convert", "diagnose": "bnlab.bn.diagnose", "load_run": "bnlab.load"}
__all__ = ["convert_bn", "diagnose", "load_run", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")

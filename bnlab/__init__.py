"""bnlab: a research harness for Batch Normalization (momentum, batch size, learning rate,
placement, missing update ops, precise BN) with Hydra sweeps, MLflow runs and report figures."""

__version__ = "0.1.0"

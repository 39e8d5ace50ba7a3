"""A run's end-of-epoch checkpoint: everything the next epoch depends on (model with its BN
buffers and shadows, FrozenBN flags, optimiser, schedule position, every RNG state, including the
generator that draws the data order), so that a resumed run continues bit for bit as if it had
never stopped. The tracker stores it (bnlab.tracking.MlflowTracker: an artifact of the run)."""
from __future__ import annotations

import io
import random
from typing import Any, Dict, Optional, Tuple

VERSION = 1
# torch loads on first use: bnlab.sweep reads the tag helpers below in the launching process.


def capture(s, epoch: int, metrics: Dict[str, float]) -> Dict[str, Any]:
    """The state after `epoch` (s: bnlab.train.Setup); `metrics` are that epoch's, returned as the
    run's result when it resumes after its last epoch."""
    import torch

    from bnlab.bn.module import BatchNorm
    state: Dict[str, Any] = {
        "version": VERSION, "epoch": epoch, "metrics": dict(metrics),
        "model": {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()},
        # FrozenBN is a flag of the module, not a buffer (bn.freeze): kept by module name.
        "frozen": {n: m.frozen for n, m in s.model.named_modules() if isinstance(m, BatchNorm)},
        "optimizer": s.opt.state_dict(),
        "global_step": s.global_step, "lr": s.lr,
        # The data order of the next epoch is the next permutation of s.gen (bnlab.data.train_batches).
        "gen": s.gen.get_state(),
        "eval_gen": s.eval_gen.get_state() if s.eval_gen is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
        "numpy_rng": _numpy_state(),
    }
    return state


def _numpy_state():
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def restore(s, state: Dict[str, Any]) -> Tuple[int, Dict[str, float]]:
    """Load `state` into a freshly built Setup; returns (epochs done, that epoch's metrics)."""
    import torch

    from bnlab.bn.module import BatchNorm
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not {VERSION}")
    s.model.load_state_dict(state["model"])
    for n, m in s.model.named_modules():
        if isinstance(m, BatchNorm):
            m.frozen = bool(state["frozen"].get(n, False))
    s.opt.load_state_dict(state["optimizer"])
    s.global_step, s.lr = int(state["global_step"]), float(state["lr"])
    s.gen.set_state(state["gen"])
    if s.eval_gen is not None and state["eval_gen"] is not None:
        s.eval_gen.set_state(state["eval_gen"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    if state["numpy_rng"] is not None:
        import numpy as np

        np.random.set_state(state["numpy_rng"])
    return int(state["epoch"]), dict(state["metrics"])


def to_bytes(state: Dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> Dict[str, Any]:
    import torch

    # Our own file (RNG states are numpy/python objects): a full unpickle, not weights_only.
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def name(epoch: int) -> str:
    """Artifact file of the checkpoint after `epoch`, under CHECKPOINT_DIR."""
    return f"epoch-{epoch:04d}.pt"


CHECKPOINT_DIR = "checkpoints"
EPOCH_TAG = "bnlab.checkpoint_epoch"  # set in the same store write as that epoch's metrics


def last_epoch(tags: Dict[str, str]) -> Optional[int]:
    v = tags.get(EPOCH_TAG)
    return int(v) if v else None

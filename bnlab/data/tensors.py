"""A user's own dataset as one .pt (torch.save of a dict) or .npz file holding x_train, y_train,
x_val, y_val; read without running code (weights_only / allow_pickle=False) and checked."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from bnlab.data.base import DataError, Dataset

KEYS = ("x_train", "y_train", "x_val", "y_val")
HOW = ("data.path must name a .pt (torch.save({'x_train': ..., 'y_train': ..., 'x_val': ..., "
       "'y_val': ...})) or .npz (numpy.savez) file; x: float (N, C, H, W) or (N, D), y: integer labels (N,)")


def _read(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k].copy()) for k in z.files}
        except Exception as e:  # not a zip, truncated, object arrays
            raise DataError(f"data.path={str(path)!r}: unreadable .npz ({type(e).__name__}: {e}); {HOW}") from e
    if path.suffix == ".pt":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any torch.load failure is a bad file
            raise DataError(f"data.path={str(path)!r}: unreadable .pt ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {HOW}") from e
        if not isinstance(d, dict):
            raise DataError(f"data.path={str(path)!r} holds a {type(d).__name__}, not a dict; {HOW}")
        return {k: torch.as_tensor(v) for k, v in d.items() if isinstance(k, str)}
    raise DataError(f"data.path={str(path)!r} has suffix {path.suffix!r}; {HOW}")


def load_tensors(path: str) -> Dataset:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path={path!r}: no such file; {HOW}")
    d = _read(p)
    missing = [k for k in KEYS if k not in d]
    if missing:
        raise DataError(f"data.path={path!r} lacks {', '.join(missing)}; {HOW}")
    xt, yt, xv, yv = (d[k] for k in KEYS)
    for name, x, y in (("train", xt, yt), ("val", xv, yv)):
        if x.dim() < 2 or not (x.is_floating_point() or x.dtype == torch.uint8):
            raise DataError(f"data.path={path!r}: x_{name} must be float with shape (N, ...), got "
                            f"{x.dtype} {tuple(x.shape)}; {HOW}")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or len(y) != len(x):
            raise DataError(f"data.path={path!r}: y_{name} must be integer labels of shape ({len(x)},), "
                            f"got {y.dtype} {tuple(y.shape)}; {HOW}")
        if len(x) == 0:
            raise DataError(f"data.path={path!r}: x_{name} is empty; {HOW}")
    if xt.shape[1:] != xv.shape[1:]:
        raise DataError(f"data.path={path!r}: x_train examples have shape {tuple(xt.shape[1:])} but x_val "
                        f"{tuple(xv.shape[1:])}; {HOW}")
    y_all = torch.cat([yt, yv]).long()
    if int(y_all.min()) < 0:
        raise DataError(f"data.path={path!r}: labels must be 0..K-1, got {int(y_all.min())}; {HOW}")
    classes = int(y_all.max()) + 1
    # uint8 images are scaled to [0, 1] like the built-in datasets; floats are used as given.
    def fl(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    return Dataset(fl(xt), yt.long(), fl(xv), yv.long(), source=str(p), classes=max(classes, 2))

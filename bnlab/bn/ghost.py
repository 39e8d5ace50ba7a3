"""Ghost batch normalisation (Hoffer, Hubara & Soudry 2017): how a batch is cut into the ghost
batches whose statistics BN uses; the module (module.py) normalises each chunk on its own."""
from __future__ import annotations

import numbers
from typing import List, Optional

from torch import Tensor

from bnlab.bn.functional import _values_per_channel


def check_ghost_batch_size(g) -> Optional[int]:
    """None, or an integer >= 2 (a ghost batch of one example has no batch statistics)."""
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 2:
        raise ValueError(f"ghost_batch_size must be an integer >= 2 or None, got {g!r}")
    return int(g)


def ghost_chunks(x: Tensor, g: int) -> List[Tensor]:
    """x split along dim 0 into consecutive chunks of g examples (x.split(g)); a last chunk with a
    single value per channel (one example of a dense input) is joined to the chunk before it, since
    it has no batch variance. Every example lands in exactly one chunk, in order."""
    chunks = list(x.split(g))
    if len(chunks) > 1 and _values_per_channel(chunks[-1]) <= 1:
        last = chunks.pop()
        chunks[-1] = x[x.shape[0] - last.shape[0] - chunks[-1].shape[0]:]
    return chunks

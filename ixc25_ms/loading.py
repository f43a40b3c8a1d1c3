"""Filling a MindSpore Cell from a state dict under official key names, with clear errors."""
from __future__ import annotations

import re
from typing import Dict, Iterable

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .checkpoint import CheckpointError

# buffers some official checkpoints carry that the model recomputes
DROPPABLE = (re.compile(r".*\.rotary_emb\.inv_freq$"), re.compile(r".*embeddings\.position_ids$"))


def is_droppable(key: str) -> bool:
    return any(p.match(key) for p in DROPPABLE)


def assign_state_dict(cell, state: Dict[str, np.ndarray], source: str = "state dict",
                      ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy `state` into `cell`'s parameters (names must match exactly).

    Raises CheckpointError naming `source` and the keys when a parameter is missing, a key is unexpected
    (besides droppable buffers and `ignore_prefixes`), or a shape differs. Nothing is assigned on error.
    """
    params = dict(cell.parameters_and_names())
    ignore_prefixes = tuple(ignore_prefixes)
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params and not is_droppable(k) and not k.startswith(ignore_prefixes)]
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                        f"({len(unexpected)} in all)")
    for k, p in params.items():
        if k in state and tuple(state[k].shape) != tuple(p.shape):
            problems.append(f"key '{k}' has shape {list(state[k].shape)}, the model expects {list(p.shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    for k, p in params.items():
        arr = np.asarray(state[k])
        if p.dtype == ms.bfloat16:
            t = Tensor(arr.astype(np.float32)).astype(ms.bfloat16)
        else:
            t = Tensor(arr.astype({ms.float32: np.float32, ms.float16: np.float16}[p.dtype], copy=False))
        p.set_data(t)

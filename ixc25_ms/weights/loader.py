"""Filling a MindSpore Cell from checkpoints under official key names: checked first, then streamed tensor by tensor."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple

import numpy as np
from mindspore import Tensor

from ..dtypes import np_dtype
from . import CheckpointError
from .keys import is_droppable
from .layout import open_weights
from .tags import widen


def check_keys(cell, shapes: Mapping[str, Tuple[int, ...]], source: str, ignore_prefixes: Iterable[str] = (),
               key_prefix: str = ""):
    """Raise CheckpointError naming `source` and the keys when a parameter is missing, a key is unexpected
    (besides droppable buffers and `ignore_prefixes`), or a shape differs. `key_prefix` is what was stripped
    from the checkpoint's keys (it is put back to tell droppable buffers)."""
    params = dict(cell.parameters_and_names())
    ignore_prefixes = tuple(ignore_prefixes)
    missing = [k for k in params if k not in shapes]
    unexpected = [k for k in shapes if k not in params and not is_droppable(key_prefix + k)
                  and not k.startswith(ignore_prefixes)]
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                        f"({len(unexpected)} in all)")
    for k, p in params.items():
        if k in shapes and tuple(shapes[k]) != tuple(p.shape):
            problems.append(f"key '{k}' has shape {list(shapes[k])}, the model expects {list(p.shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def set_parameter(p, arr: np.ndarray):
    t = Tensor(arr.astype(np_dtype(p.dtype), copy=False))
    p.set_data(t if t.dtype == p.dtype else t.astype(p.dtype))  # bf16: fp32 on the host, cast


def assign_state_dict(cell, state: Dict[str, np.ndarray], source: str = "state dict",
                      ignore_prefixes: Iterable[str] = (), prefix: str = "") -> None:
    """Copy an in-memory `state` into `cell` (names must match); nothing is assigned on error.

    With `prefix`, only keys starting with it are considered and it is stripped (e.g. prefix 'vit.' fills a
    bare CLIPVisionTower from a whole-model state dict)."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_keys(cell, {k: tuple(np.shape(v)) for k, v in state.items()}, source, ignore_prefixes, prefix)
    for k, p in cell.parameters_and_names():
        set_parameter(p, np.asarray(state[k]))


def stream_into(cell, path: str, allow_pickle: bool = False) -> None:
    """Fill `cell` from a checkpoint (any layout) with about one tensor of extra memory (not a second copy of
    the model): keys and shapes are checked first, so nothing is assigned on error."""
    src = open_weights(path, allow_pickle)
    try:
        params = dict(cell.parameters_and_names())
        keys = [k for k in src.keys() if k in params]  # the rest: droppable buffers (check_keys says)
        if src.shapes_from_files:
            check_keys(cell, {k: src.shape(k) for k in src.keys()}, path)
            items = ((k, src.read(k, None)) for k in keys)
        else:  # shapes from a side record (.ckpt shards): read everything stored, then check
            state = {k: src.read(k, None) for k in src.keys()}
            check_keys(cell, {k: v.shape for k, v in state.items()}, path)
            items = ((k, state.pop(k)) for k in keys)
        for k, arr in items:
            p = params[k]
            set_parameter(p, widen(arr, src.dtype_tag(k), np_dtype(p.dtype)))
    finally:
        src.close()

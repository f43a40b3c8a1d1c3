"""Filling a MindSpore Cell from checkpoints under official key names: checked first, then streamed tensor by tensor."""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Iterator, Mapping, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .dtypes import np_dtype
from .checkpoint import CheckpointError, SafetensorsFile, bf16_to_f32, iter_raw_tensors, list_weight_files

# buffers some official checkpoints carry that the model recomputes
DROPPABLE = (re.compile(r".*\.rotary_emb\.inv_freq$"), re.compile(r".*embeddings\.position_ids$"))


def is_droppable(key: str) -> bool:
    return any(p.match(key) for p in DROPPABLE)


def check_keys(cell, shapes: Mapping[str, Tuple[int, ...]], source: str, ignore_prefixes: Iterable[str] = ()):
    """Raise CheckpointError naming `source` and the keys when a parameter is missing, a key is unexpected
    (besides droppable buffers and `ignore_prefixes`), or a shape differs."""
    params = dict(cell.parameters_and_names())
    ignore_prefixes = tuple(ignore_prefixes)
    missing = [k for k in params if k not in shapes]
    unexpected = [k for k in shapes if k not in params and not is_droppable(k) and not k.startswith(ignore_prefixes)]
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


def _set(p, arr: np.ndarray):
    t = Tensor(arr.astype(np_dtype(p.dtype), copy=False))
    p.set_data(t if t.dtype == p.dtype else t.astype(p.dtype))  # bf16: fp32 on the host, cast


def assign_state_dict(cell, state: Dict[str, np.ndarray], source: str = "state dict",
                      ignore_prefixes: Iterable[str] = (), prefix: str = "") -> None:
    """Copy an in-memory `state` into `cell` (names must match); nothing is assigned on error.

    With `prefix`, only keys starting with it are considered and it is stripped (e.g. prefix 'vit.' fills a
    bare CLIPVisionTower from a whole-model state dict)."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_keys(cell, {k: tuple(np.shape(v)) for k, v in state.items()}, source, ignore_prefixes)
    for k, p in cell.parameters_and_names():
        _set(p, np.asarray(state[k]))


# ------------------------------------------------------------------------------------------ streaming
def _header_shapes(path: str, allow_pickle: bool):
    """{key: shape} from safetensors headers alone, or None when the layout needs a full read."""
    from .ms_checkpoint import is_converted_dir, read_index
    if os.path.isdir(path) and is_converted_dir(path):
        fmt, wm = read_index(path)
        if fmt != "safetensors":
            return None
        files = sorted(set(wm.values()))
        paths = [os.path.join(path, f) for f in files]
    else:
        paths = list_weight_files(path, allow_pickle)
        if any(p.endswith(".bin") for p in paths):
            return None
    shapes: Dict[str, Tuple[int, ...]] = {}
    for fn in paths:
        st = SafetensorsFile(fn)
        for k in st.keys():
            if k in shapes:
                raise CheckpointError(f"{fn}: key '{k}' appears in more than one file")
            shapes[k] = st.shape(k)
    return shapes


def iter_weights(path: str, allow_pickle: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
    """(key, float32-or-stored array) over a checkpoint, one tensor (one shard for .bin/.ckpt) at a time."""
    from .ms_checkpoint import is_converted_dir, iter_converted
    if os.path.isdir(path) and is_converted_dir(path):
        yield from iter_converted(path, dtype=None)
        return
    for _, k, tag, arr in iter_raw_tensors(path, allow_pickle):
        yield k, arr


def stream_into(cell, path: str, allow_pickle: bool = False) -> None:
    """Fill `cell` from a checkpoint directory with about one tensor of extra memory (not a second copy of
    the model): keys and shapes are checked from headers first, so nothing is assigned on error."""
    shapes = _header_shapes(path, allow_pickle)
    if shapes is None:  # pickle or .ckpt shards: read whole, then check
        state = {}
        for k, arr in iter_weights(path, allow_pickle):
            state[k] = arr
        check_keys(cell, {k: v.shape for k, v in state.items()}, path)
        items = state.items()
    else:
        check_keys(cell, shapes, path)
        items = iter_weights(path, allow_pickle)
    params = dict(cell.parameters_and_names())
    for k, arr in items:
        if k not in params:
            continue  # droppable buffers
        if arr.dtype == np.uint16:  # every parameter is floating point: uint16 here means stored bf16 bits
            arr = bf16_to_f32(arr)
        _set(params[k], arr)

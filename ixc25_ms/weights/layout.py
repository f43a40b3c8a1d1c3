"""Which layout a checkpoint path has, and the one function that opens the right weight source for it."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from . import CheckpointError
from .sources import MsCkptSource, PickleSource, SafetensorsSource, WeightSource

CONVERSION_FILE = "conversion.json"       # the record ixc25-convert writes; its presence marks our layout
MS_INDEX = "ms_model.index.json"          # our index: {"metadata": {"format", ...}, "weight_map"}
MS_FORMATS = ("safetensors", "ckpt")
TORCH_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def is_converted_dir(path: str) -> bool:
    """True for a directory written by ixc25-convert (it has conversion.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONVERSION_FILE))


def _read_index(index: str) -> dict:
    """An index file's JSON, its weight_map checked to be an object."""
    try:
        with open(index, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d["weight_map"], dict):
            raise TypeError("weight_map is not an object")
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index file ({e})") from None
    return d


def _indexed_files(index: str, wm: Dict[str, str]) -> List[str]:
    """The files an index names, in order, each checked to exist."""
    base = os.path.dirname(index)
    files = list(dict.fromkeys(wm.values()))
    for fn in files:
        if not os.path.isfile(os.path.join(base, fn)):
            key = next(k for k, v in wm.items() if v == fn)
            raise CheckpointError(f"{index}: names missing file '{fn}' (for key '{key}')")
    return [os.path.join(base, fn) for fn in files]


def _no_pickle(where: str) -> CheckpointError:
    return CheckpointError(f"{where}: pickle checkpoint; pass allow_pickle=True (--allow-pickle) to read it "
                           f"with torch.load(weights_only=True)")


def list_weight_files(path: str, allow_pickle: bool = False) -> Tuple[List[str], Optional[str], Dict[str, str]]:
    """(weight files, index file or None, its weight map) of an official-layout directory or single file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".bin") and not allow_pickle:
            raise _no_pickle(path)
        return [path], None, {}
    for name, pickle in ((TORCH_INDEX, False), (PICKLE_INDEX, True)):
        index = os.path.join(path, name)
        if os.path.isfile(index):
            if pickle and not allow_pickle:
                raise _no_pickle(index)
            wm = _read_index(index)["weight_map"]
            return _indexed_files(index, wm), index, wm
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single], None, {}
    names = sorted(os.listdir(path))
    bins = [f for f in names if f.startswith("pytorch_model") and f.endswith(".bin")]
    if bins and not allow_pickle:
        raise _no_pickle(os.path.join(path, bins[0]))
    found = bins or [f for f in names if f.endswith(".safetensors")]
    if not found:
        raise CheckpointError(f"{path}: not a checkpoint directory (no model.safetensors, index or "
                              f"pytorch_model*.bin)")
    return [os.path.join(path, f) for f in found], None, {}


def read_index(path: str) -> Tuple[str, Dict[str, str], List[str]]:
    """(format, {parameter name: shard file name}, shard paths) of a converted directory, shards checked to exist."""
    index = os.path.join(path, MS_INDEX)
    d = _read_index(index)
    meta = d.get("metadata")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in MS_FORMATS:
        raise CheckpointError(f"{index}: not a valid ixc25-convert index (format {fmt!r})")
    return fmt, d["weight_map"], _indexed_files(index, d["weight_map"])


def read_records(path: str) -> Dict[str, dict]:
    """{MindSpore name: its record} of the converted tensors in a converted directory's conversion.json."""
    rec_path = os.path.join(path, CONVERSION_FILE)
    try:
        with open(rec_path, encoding="utf-8") as f:
            record = json.load(f)
        return {t["target"]: t for t in record["tensors"] if t.get("target") not in (None, "dropped")}
    except OSError as e:
        raise CheckpointError(f"{rec_path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{rec_path}: not a valid conversion record ({e})") from None


def open_weights(path: str, allow_pickle: bool = False) -> WeightSource:
    """The weight source of a checkpoint path (the one place that tells the layouts apart): a directory written
    by ixc25-convert (safetensors or ckpt shards), or an official directory or single file (model.safetensors,
    sharded safetensors + index, or pytorch_model*.bin (+ index) with allow_pickle). Indexes are checked."""
    if is_converted_dir(path):
        fmt, wm, files = read_index(path)
        if fmt == "ckpt":
            return MsCkptSource(path, wm, read_records(path), os.path.join(path, CONVERSION_FILE))
        src: WeightSource = SafetensorsSource(path, files, "converted")
        src.check_index(os.path.join(path, MS_INDEX), wm)
        return src
    files, index, wm = list_weight_files(path, allow_pickle)
    src = (PickleSource if files[0].endswith(".bin") else SafetensorsSource)(path, files, "official")
    if index is not None:
        src.check_index(index, wm)
    return src


def iter_tensors(path: str, dtype=np.float32, names: Optional[Iterable[str]] = None,
                 allow_pickle: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
    """(key, array) over a checkpoint of any layout, file by file; floats in `dtype` (bf16 widened exactly;
    None: as stored, bf16 as uint16 bits). `names` restricts to those keys."""
    src = open_weights(path, allow_pickle)
    order = {k: i for i, k in enumerate(src.keys())}
    keys = src.keys() if names is None else list(names)
    for k in keys:
        if k not in order:
            raise CheckpointError(f"{path}: no key '{k}'")
    try:
        for k in sorted(keys, key=order.__getitem__):
            yield k, src.read(k, dtype)
    finally:
        src.close()


def load_state_dict(path: str, dtype=np.float32, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint (any layout) as numpy arrays, floats in `dtype` (bf16 widened exactly)."""
    return dict(iter_tensors(path, dtype, allow_pickle=allow_pickle))

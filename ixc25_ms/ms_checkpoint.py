"""Reading checkpoint directories written by ixc25-convert (MindSpore safetensors or ckpt shards + index)."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .checkpoint import FLOAT_TAGS, ST_DTYPES, CheckpointError, SafetensorsFile, bf16_to_f32

CONVERSION_FILE = "conversion.json"
MS_INDEX = "ms_model.index.json"
MS_FORMATS = ("safetensors", "ckpt")


def is_converted_dir(path: str) -> bool:
    """True for a directory written by ixc25-convert (it has conversion.json and ms_model.index.json)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONVERSION_FILE))
            and os.path.isfile(os.path.join(path, MS_INDEX)))


def read_index(path: str) -> Tuple[str, Dict[str, str]]:
    """(format, {parameter name: shard file name}) of a converted directory, every shard checked to exist."""
    index = os.path.join(path, MS_INDEX)
    try:
        with open(index, encoding="utf-8") as f:
            d = json.load(f)
        fmt, wm = d["metadata"]["format"], d["weight_map"]
        if fmt not in MS_FORMATS or not isinstance(wm, dict):
            raise ValueError(f"format {fmt!r}")
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid ixc25-convert index ({e})") from None
    for key, fn in wm.items():
        if not os.path.isfile(os.path.join(path, fn)):
            raise CheckpointError(f"{index}: names missing file '{fn}' (for key '{key}')")
    return fmt, wm


def ms_numpy_dtype(tag: str):
    """The numpy dtype MindSpore uses for a safetensors tag (BF16 -> MindSpore's numpy bfloat16)."""
    if tag == "BF16":
        import mindspore as ms
        return np.dtype(ms.common.dtype_to_nptype(ms.bfloat16))
    return np.dtype(ST_DTYPES[tag])


_MS_TO_TAG = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int64": "I64",
              "Int32": "I32", "Int16": "I16", "Int8": "I8", "UInt8": "U8", "Bool": "BOOL"}


def read_ms_ckpt(path: str) -> Dict[str, Tuple[str, np.ndarray]]:
    """{name: (tag, raw array)} of a MindSpore .ckpt file (bf16 as uint16 bits), via mindspore.load_checkpoint."""
    import mindspore as ms
    try:
        params = ms.load_checkpoint(path, format="ckpt")
    except Exception as e:  # MindSpore raises ValueError/RuntimeError with multi-line text
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: cannot load MindSpore checkpoint ({type(e).__name__}: {msg})") from None
    out = {}
    for name, p in params.items():
        tag = _MS_TO_TAG.get(str(p.dtype))
        if tag is None:
            raise CheckpointError(f"{path}: key '{name}' has unsupported dtype {p.dtype}")
        arr = p.asnumpy()
        if tag == "BF16":
            arr = arr.view(np.uint16)
        out[name] = (tag, arr)
    return out


def _read_st_raw(st: SafetensorsFile, key: str) -> np.ndarray:
    """Writable copy of a stored tensor (bf16 as uint16 bits)."""
    tag, shape, b, e = st.entries[key]
    arr = np.empty(shape, dtype=ST_DTYPES[tag])
    with open(st.path, "rb") as f:
        f.seek(st.data_start + b)
        n = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
    if n != e - b:
        raise CheckpointError(f"{st.path}: truncated file while reading key '{key}'")
    return arr


def _widen(tag: str, arr: np.ndarray, dtype) -> np.ndarray:
    if dtype is None or tag not in FLOAT_TAGS:
        return arr
    if tag == "BF16":
        arr = bf16_to_f32(arr)
    return arr.astype(dtype, copy=False)


def iter_converted(path: str, dtype=np.float32, names: Optional[List[str]] = None
                   ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (official parameter name, array) shard by shard; floats in `dtype` (None: as stored, bf16 as
    uint16 bits). `names` restricts to those parameters."""
    fmt, wm = read_index(path)
    wanted = None if names is None else set(names)
    if wanted is not None:
        unknown = sorted(wanted - set(wm))
        if unknown:
            raise CheckpointError(f"{os.path.join(path, MS_INDEX)}: no key '{unknown[0]}'")
    files: Dict[str, List[str]] = {}
    for key, fn in wm.items():
        if wanted is None or key in wanted:
            files.setdefault(fn, []).append(key)
    for fn, keys in files.items():
        full = os.path.join(path, fn)
        if fmt == "safetensors":
            st = SafetensorsFile(full)
            for k in keys:
                if k not in st.entries:
                    raise CheckpointError(f"{full}: no key '{k}' (the index maps it here)")
                yield k, _widen(st.dtype_tag(k), _read_st_raw(st, k), dtype)
        else:
            data = read_ms_ckpt(full)
            for k in keys:
                if k not in data:
                    raise CheckpointError(f"{full}: no key '{k}' (the index maps it here)")
                tag, arr = data.pop(k)
                yield k, _widen(tag, arr, dtype)


def load_converted(path: str, dtype=np.float32) -> Dict[str, np.ndarray]:
    """Every parameter of a converted directory under its official name; floats in `dtype` (bf16 widened
    exactly; None keeps the stored dtype with bf16 as uint16 bits)."""
    if not is_converted_dir(path):
        raise CheckpointError(f"{path}: not an ixc25-convert output directory (no {CONVERSION_FILE} / {MS_INDEX})")
    return dict(iter_converted(path, dtype))

"""Stored dtypes: safetensors tags <-> numpy storage dtypes, and the one bf16 widening / narrowing pair."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from . import CheckpointError

# safetensors dtype tag -> numpy storage dtype (bf16 is stored as uint16 bits)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NP_TO_ST = {np.dtype(v): k for k, v in ST_DTYPES.items() if k != "BF16"}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
CAST_CHUNK = 1 << 24  # elements per cast step: bounds the temporaries of cast_raw


def tag_size(tag: str) -> int:
    """Bytes per element of a safetensors tag."""
    return np.dtype(ST_DTYPES[tag]).itemsize


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bit patterns, round to nearest even (as torch does); NaN kept NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def widen(arr: np.ndarray, tag: str, dtype=np.float32) -> np.ndarray:
    """A stored array -> floats in `dtype` (bf16 bits widened exactly); integers, and dtype None, as stored."""
    if dtype is None or tag not in FLOAT_TAGS:
        return arr
    if tag == "BF16":
        arr = bf16_to_f32(arr)
    return arr.astype(dtype, copy=False)


def to_st(arr: np.ndarray) -> Tuple[str, np.ndarray]:
    """numpy array -> (safetensors tag, array) for write_safetensors."""
    if arr.dtype not in NP_TO_ST:
        raise CheckpointError(f"cannot store numpy dtype {arr.dtype} in safetensors")
    return NP_TO_ST[arr.dtype], arr


def cast_raw(arr: np.ndarray, src: str, dst: str, warn: Optional[List[str]] = None, key: str = "") -> np.ndarray:
    """Cast a stored float tensor (bf16 as uint16 bits) between F32/F16/BF16 in CAST_CHUNK steps; same tag:
    unchanged. To bf16 rounds to nearest even; fp16 overflows (finite -> inf) are counted into `warn`."""
    if src == dst:
        return arr
    out = np.empty(arr.shape, dtype=ST_DTYPES[dst])
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    overflow = 0
    for i in range(0, flat_in.size, CAST_CHUNK):
        x = widen(flat_in[i:i + CAST_CHUNK], src)
        if dst == "F32":
            y = x
        elif dst == "F16":
            with np.errstate(over="ignore"):
                y = x.astype(np.float16)
            overflow += int(np.count_nonzero(np.isinf(y) & np.isfinite(x)))
        else:
            y = f32_to_bf16(x)
        flat_out[i:i + CAST_CHUNK] = y
    if overflow and warn is not None:
        warn.append(f"key '{key}': {overflow} value(s) beyond the fp16 range became inf")
    return out

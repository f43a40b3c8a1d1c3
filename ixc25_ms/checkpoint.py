"""Checkpoint files: a dependency-free safetensors reader/writer (bf16 included) and official-layout discovery."""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt or inconsistent (the message names file and key)."""


# safetensors dtype tag -> numpy storage dtype (bf16 is stored as uint16 bits)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NP_TO_ST = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
            np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024


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


class SafetensorsFile:
    """Lazy reader of one .safetensors file: the header is parsed and checked up front, tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n == 0 or n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                tag, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors header entry for key '{key}'") from None
            if tag not in ST_DTYPES:
                raise CheckpointError(f"{path}: key '{key}' has unsupported dtype {tag}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[tag]).itemsize
            if e - b != nbytes or b < 0:
                raise CheckpointError(f"{path}: key '{key}' has {e - b} bytes for shape {list(shape)} {tag}")
            if self.data_start + e > size:
                raise CheckpointError(f"{path}: truncated file: key '{key}' ends at byte {self.data_start + e}, "
                                      f"file has {size}")
            self.entries[key] = (tag, shape, b, e)

    def keys(self) -> List[str]:
        return list(self.entries)

    def dtype_tag(self, key: str) -> str:
        return self.entries[key][0]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.entries[key][1]

    def nbytes(self, key: str) -> int:
        t = self.entries[key]
        return t[3] - t[2]

    def read_raw(self, key: str) -> np.ndarray:
        """The stored array (bf16 as uint16 bits), bit for bit."""
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: no key '{key}'")
        tag, shape, b, e = self.entries[key]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            buf = f.read(e - b)
        if len(buf) != e - b:
            raise CheckpointError(f"{self.path}: truncated file while reading key '{key}'")
        return np.frombuffer(buf, dtype=ST_DTYPES[tag]).reshape(shape)

    def read(self, key: str, dtype=np.float32) -> np.ndarray:
        """Floats converted to `dtype` (bf16 widened exactly); integer tensors returned as stored."""
        arr = self.read_raw(key)
        tag = self.dtype_tag(key)
        if tag == "BF16":
            arr = bf16_to_f32(arr)
        if tag in FLOAT_TAGS and dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return arr


def write_safetensors(path: str, tensors: Dict[str, Tuple[str, np.ndarray]], metadata: Optional[dict] = None):
    """Write {name: (dtype_tag, array)} (BF16 arrays given as uint16 bits) to `path` in safetensors format."""
    header, offset = {}, 0
    for name, (tag, arr) in tensors.items():
        n = arr.nbytes
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, (_, arr) in tensors.items():
            f.write(np.ascontiguousarray(arr).tobytes())


def to_st(arr: np.ndarray) -> Tuple[str, np.ndarray]:
    """numpy array -> (safetensors tag, array) for write_safetensors."""
    if arr.dtype not in NP_TO_ST:
        raise CheckpointError(f"cannot store numpy dtype {arr.dtype} in safetensors")
    return NP_TO_ST[arr.dtype], arr


# ---------------------------------------------------------------------------------------- directory layout
def list_weight_files(path: str, allow_pickle: bool = False) -> List[str]:
    """The weight files of an official-layout checkpoint directory (or a single file), index-checked."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".bin") and not allow_pickle:
            raise CheckpointError(f"{path}: pickle checkpoint; pass allow_pickle=True (--allow-pickle) to read "
                                  f"it with torch.load(weights_only=True)")
        return [path]
    for index_name, pickle in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            if pickle and not allow_pickle:
                raise CheckpointError(f"{index}: pickle checkpoint; pass allow_pickle=True (--allow-pickle)")
            try:
                with open(index, encoding="utf-8") as f:
                    wm = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e})") from None
            files = []
            for key, fn in wm.items():
                if fn not in files:
                    files.append(fn)
            for fn in files:
                if not os.path.isfile(os.path.join(path, fn)):
                    key = next(k for k, v in wm.items() if v == fn)
                    raise CheckpointError(f"{index}: names missing file '{fn}' (for key '{key}')")
            return [os.path.join(path, fn) for fn in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if bins:
        if not allow_pickle:
            raise CheckpointError(f"{path}: only pickle checkpoints ({bins[0]}); pass allow_pickle=True "
                                  f"(--allow-pickle) to read them with torch.load(weights_only=True)")
        return [os.path.join(path, b) for b in bins]
    sts = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if sts:
        return [os.path.join(path, s) for s in sts]
    raise CheckpointError(f"{path}: not a checkpoint directory (no model.safetensors, index or "
                          f"pytorch_model*.bin)")


def _load_pickle(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin checkpoints needs torch installed") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles
        raise CheckpointError(f"{path}: cannot load pickle checkpoint ({type(e).__name__}: {e})") from None
    out = {}
    for k, v in sd.items():
        if v.dtype == torch.bfloat16:
            out[k] = ("BF16", v.contiguous().view(torch.int16).numpy().view(np.uint16))
        else:
            arr = v.contiguous().numpy()
            out[k] = (NP_TO_ST.get(arr.dtype, "F32"), arr)
    return out


def iter_raw_tensors(path: str, allow_pickle: bool = False) -> Iterator[Tuple[str, str, str, np.ndarray]]:
    """Yield (file, key, dtype tag, raw array) over every tensor, one file in memory at a time."""
    for fn in list_weight_files(path, allow_pickle):
        if fn.endswith(".bin"):
            for k, (tag, arr) in _load_pickle(fn).items():
                yield fn, k, tag, arr
        else:
            st = SafetensorsFile(fn)
            for k in st.keys():
                yield fn, k, st.dtype_tag(k), st.read_raw(k)


def load_state_dict(path: str, dtype=np.float32, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays, floats in `dtype` (bf16 widened exactly)."""
    out: Dict[str, np.ndarray] = {}
    seen: Dict[str, str] = {}
    for fn, k, tag, arr in iter_raw_tensors(path, allow_pickle):
        if k in seen:
            raise CheckpointError(f"{fn}: key '{k}' also appears in {seen[k]}")
        seen[k] = fn
        if tag == "BF16":
            arr = bf16_to_f32(arr)
        if tag in FLOAT_TAGS:
            arr = arr.astype(dtype, copy=False)
        out[k] = arr
    return out

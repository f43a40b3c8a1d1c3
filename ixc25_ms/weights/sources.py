"""Weight sources, one type per storage format, with one interface: keys, shape, dtype_tag, read, span."""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import CheckpointError
from .safetensors import SafetensorsFile, Span
from .tags import NP_TO_ST, ST_DTYPES, widen

Entry = Tuple[str, Tuple[int, ...], str]  # (dtype tag, shape, file)


class WeightSource:
    """The tensors of one checkpoint under their stored names; files are read lazily, one file at a time.

    `layout` is "official" or "converted" (written by ixc25-convert); `shapes_from_files` is False where keys
    and shapes come from a side record rather than the weight files (then a loader reads before it assigns)."""
    format = ""
    shapes_from_files = True

    def __init__(self, root: str, layout: str):
        self.root = root
        self.layout = layout
        self.entries: Dict[str, Entry] = {}

    def _add(self, path: str, key: str, tag: str, shape) -> None:
        if key in self.entries:
            raise CheckpointError(f"{path}: key '{key}' also appears in {self.entries[key][2]}")
        self.entries[key] = (tag, tuple(shape), path)

    def _entry(self, key: str) -> Entry:
        if key not in self.entries:
            raise CheckpointError(f"{self.root}: no key '{key}'")
        return self.entries[key]

    @property
    def files(self) -> List[str]:
        """The weight files, in the order their first key appears."""
        return list(dict.fromkeys(e[2] for e in self.entries.values()))

    def keys(self) -> List[str]:
        return list(self.entries)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entry(key)[1]

    def dtype_tag(self, key: str) -> str:
        return self._entry(key)[0]

    def file_of(self, key: str) -> str:
        return self._entry(key)[2]

    def span(self, key: str) -> Optional[Span]:
        """The stored bytes of `key` as a file range, where the format stores them plainly (else None)."""
        return None

    def read_raw(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def read(self, key: str, dtype=np.float32) -> np.ndarray:
        """The tensor: dtype None gives the stored bits (bf16 as uint16), float32 (or another float dtype)
        the floats widened exactly; integer tensors always as stored."""
        return widen(self.read_raw(key), self.dtype_tag(key), dtype)

    def check_index(self, index_path: str, weight_map: Mapping[str, str]) -> None:
        """Every key of every file listed in the index under that file, and nothing else."""
        base = os.path.dirname(index_path)
        for key, (_tag, _shape, path) in self.entries.items():
            name = os.path.relpath(path, base)
            if key not in weight_map:
                raise CheckpointError(f"{index_path}: key '{key}' of {name} is not in the index")
            if weight_map[key] != name:
                raise CheckpointError(f"{index_path}: key '{key}' is in {name}, the index says {weight_map[key]}")
        for key, fn in weight_map.items():
            if key not in self.entries:
                raise CheckpointError(f"{index_path}: key '{key}' is mapped to {fn} but that file has no such key")

    def close(self) -> None:
        """Drop whatever file is held in memory."""


class SafetensorsSource(WeightSource):
    """.safetensors files (official single/sharded, or converted): headers parsed up front, tensors by readinto."""
    format = "safetensors"

    def __init__(self, root: str, files: List[str], layout: str = "official"):
        super().__init__(root, layout)
        self._st: Dict[str, SafetensorsFile] = {}
        for fn in files:
            st = self._st[fn] = SafetensorsFile(fn)
            for k in st.keys():
                self._add(fn, k, st.dtype_tag(k), st.shape(k))

    def span(self, key: str) -> Span:
        return self._st[self.file_of(key)].span(key)

    def read_raw(self, key: str) -> np.ndarray:
        return self._st[self.file_of(key)].read_raw(key)


class StateSource(WeightSource):
    """An in-memory state dict {key: numpy array} as a weight source (float32/float16/int8 arrays as they are;
    tests and benchmarks quantise a drawn model through it without writing a checkpoint)."""
    format = "state"

    def __init__(self, state: Mapping[str, np.ndarray], name: str = "state dict"):
        super().__init__(name, "official")
        self.state = state
        for k, v in state.items():
            a = np.asarray(v)
            if a.dtype not in NP_TO_ST:
                raise CheckpointError(f"{name}: key '{k}' has unsupported dtype {a.dtype}")
            self._add(name, k, NP_TO_ST[a.dtype], a.shape)

    def read_raw(self, key: str) -> np.ndarray:
        self._entry(key)
        return np.asarray(self.state[key])


class _OneFileAtATime(WeightSource):
    """A source whose files load whole (pickle, MindSpore ckpt): the current file is kept until another is read."""

    def __init__(self, root: str, layout: str):
        super().__init__(root, layout)
        self._current: Tuple[Optional[str], dict] = (None, {})

    def _load(self, path: str) -> dict:
        raise NotImplementedError

    def _file_data(self, path: str) -> dict:
        if self._current[0] != path:
            self._current = (None, {})
            self._current = (path, self._load(path))
        return self._current[1]

    def close(self) -> None:
        self._current = (None, {})


# torch dtype name -> safetensors tag
TORCH_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def torch_load(path: str) -> dict:
    """A pickle checkpoint via torch.load(weights_only=True), memory-mapped where its format allows."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin checkpoints needs torch installed") from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: cannot load pickle checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


class PickleSource(_OneFileAtATime):
    """pytorch_model*.bin files (official): each loaded once up front for its keys, then again when read."""
    format = "pickle"

    def __init__(self, root: str, files: List[str], layout: str = "official"):
        super().__init__(root, layout)
        for fn in files:
            sd = torch_load(fn)
            for k, v in sd.items():
                name = str(v.dtype).replace("torch.", "")
                if name not in TORCH_TAGS:
                    raise CheckpointError(f"{fn}: key '{k}' has unsupported dtype {name} "
                                          f"(supported: {', '.join(TORCH_TAGS)})")
                self._add(fn, k, TORCH_TAGS[name], v.shape)
            self._current = (fn, sd)

    def _load(self, path: str) -> dict:
        return torch_load(path)

    def read_raw(self, key: str) -> np.ndarray:
        import torch
        v = self._file_data(self.file_of(key))[key].contiguous()
        if v.dtype == torch.bfloat16:
            return v.view(torch.int16).numpy().view(np.uint16)
        return v.numpy()


# MindSpore dtype name -> safetensors tag
MS_TAGS = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int64": "I64",
           "Int32": "I32", "Int16": "I16", "Int8": "I8", "UInt8": "U8", "Bool": "BOOL"}


def ms_numpy_dtype(tag: str):
    """The numpy dtype MindSpore uses for a safetensors tag (BF16 -> MindSpore's numpy bfloat16)."""
    if tag == "BF16":
        import mindspore as ms
        return np.dtype(ms.common.dtype_to_nptype(ms.bfloat16))
    return np.dtype(ST_DTYPES[tag])


def read_ms_ckpt(path: str) -> Dict[str, Tuple[str, np.ndarray]]:
    """{name: (tag, stored array)} of a MindSpore .ckpt file (bf16 as uint16 bits), via mindspore.load_checkpoint."""
    import mindspore as ms
    try:
        params = ms.load_checkpoint(path, format="ckpt")
    except Exception as e:  # MindSpore raises ValueError/RuntimeError with multi-line text
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: cannot load MindSpore checkpoint ({type(e).__name__}: {msg})") from None
    out = {}
    for name, p in params.items():
        tag = MS_TAGS.get(str(p.dtype))
        if tag is None:
            raise CheckpointError(f"{path}: key '{name}' has unsupported dtype {p.dtype}")
        arr = p.asnumpy()
        out[name] = (tag, arr.view(np.uint16) if tag == "BF16" else arr)
    return out


class MsCkptSource(_OneFileAtATime):
    """MindSpore .ckpt shards of a converted directory: keys, dtypes and shapes from its conversion record
    (a .ckpt has no header to read them from), checked against each shard when it is loaded."""
    format = "ckpt"
    shapes_from_files = False

    def __init__(self, root: str, weight_map: Mapping[str, str], records: Mapping[str, dict], record_path: str):
        super().__init__(root, "converted")
        self.record_path = record_path
        by_file: Dict[str, List[str]] = {}
        for k, fn in weight_map.items():
            by_file.setdefault(fn, []).append(k)
        for fn, keys in by_file.items():
            for k in keys:
                if k not in records:
                    raise CheckpointError(f"{record_path}: no record of key '{k}' (the index maps it to {fn})")
                r = records[k]
                self._add(os.path.join(root, fn), k, r["dtype"], r.get("target_shape", r["shape"]))

    def _load(self, path: str) -> dict:
        data = read_ms_ckpt(path)
        want = {k for k, e in self.entries.items() if e[2] == path}
        if set(data) != want:
            odd = sorted(set(data) ^ want)
            raise CheckpointError(f"{path}: key '{odd[0]}' disagrees with {self.record_path}")
        return data

    def read_raw(self, key: str) -> np.ndarray:
        tag, shape, path = self._entry(key)
        got_tag, arr = self._file_data(path)[key]
        if (got_tag, tuple(arr.shape)) != (tag, shape):
            raise CheckpointError(f"{path}: key '{key}' is {got_tag} {list(arr.shape)}, {self.record_path} "
                                  f"records {tag} {list(shape)}")
        return arr

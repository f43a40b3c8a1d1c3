"""The safetensors format: header parse and checks, byte spans, raw reads into writable arrays, the writer."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import CheckpointError
from .tags import ST_DTYPES, tag_size, widen

MAX_HEADER = 100 * 1024 * 1024


@dataclass
class Span:
    """A byte range of a file: the stored bytes of one tensor."""
    path: str
    offset: int
    nbytes: int


def read_span(span: Span, tag: str, shape, key: str = "") -> np.ndarray:
    """The stored array of a span (bf16 as uint16 bits), read with readinto into a fresh writable array."""
    arr = np.empty(shape, dtype=ST_DTYPES[tag])
    mv = memoryview(arr.reshape(-1).view(np.uint8))
    if len(mv) != span.nbytes:
        raise CheckpointError(f"{span.path}: key '{key}' has {span.nbytes} bytes for shape {list(shape)} {tag}")
    try:
        with open(span.path, "rb", buffering=0) as f:
            f.seek(span.offset)
            done = 0
            while done < span.nbytes:
                n = f.readinto(mv[done:])
                if not n:
                    break
                done += n
    except OSError as e:
        raise CheckpointError(f"{span.path}: cannot read key '{key}' ({e.strerror})") from None
    if done != span.nbytes:
        raise CheckpointError(f"{span.path}: truncated file while reading key '{key}'")
    return arr


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
            nbytes = int(np.prod(shape, dtype=np.int64)) * tag_size(tag)
            if e - b != nbytes or b < 0:
                raise CheckpointError(f"{path}: key '{key}' has {e - b} bytes for shape {list(shape)} {tag}")
            if self.data_start + e > size:
                raise CheckpointError(f"{path}: truncated file: key '{key}' ends at byte {self.data_start + e}, "
                                      f"file has {size}")
            self.entries[key] = (tag, shape, b, e)

    def _entry(self, key: str):
        if key not in self.entries:
            raise CheckpointError(f"{self.path}: no key '{key}'")
        return self.entries[key]

    def keys(self) -> List[str]:
        return list(self.entries)

    def dtype_tag(self, key: str) -> str:
        return self._entry(key)[0]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entry(key)[1]

    def span(self, key: str) -> Span:
        """Where the stored bytes of `key` are (no read)."""
        _tag, _shape, b, e = self._entry(key)
        return Span(self.path, self.data_start + b, e - b)

    def read_raw(self, key: str) -> np.ndarray:
        """The stored array (bf16 as uint16 bits), bit for bit, in a writable array of its own."""
        tag, shape, _b, _e = self._entry(key)
        return read_span(self.span(key), tag, shape, key)

    def read(self, key: str, dtype=np.float32) -> np.ndarray:
        """Floats converted to `dtype` (bf16 widened exactly; None: as stored); integer tensors as stored."""
        return widen(self.read_raw(key), self.dtype_tag(key), dtype)


def header_bytes(entries: Iterable[Tuple[str, str, Tuple[int, ...], int]], metadata: Optional[dict]
                 ) -> Tuple[bytes, int]:
    """[(name, tag, shape, nbytes)] in file order -> (8-byte length + JSON header padded to 8 with spaces,
    data bytes). Metadata first and JSON without spaces, as safetensors (and so MindSpore) writes it."""
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tag, shape, n in entries:
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb, off


def write_safetensors(path: str, tensors: Dict[str, Tuple[str, np.ndarray]], metadata: Optional[dict] = None,
                      fsync: bool = False) -> None:
    """Write {name: (dtype_tag, array)} (BF16 arrays given as uint16 bits) to `path` in safetensors format,
    from the arrays' memory (no copies), under a temporary name renamed onto `path` at the end."""
    arrays = [(name, tag, np.ascontiguousarray(arr)) for name, (tag, arr) in tensors.items()]
    head, _ = header_bytes(((n, t, a.shape, a.nbytes) for n, t, a in arrays), metadata)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for _, _, arr in arrays:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

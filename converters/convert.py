"""Streaming, accounted, atomic conversion: official PyTorch checkpoint <-> our MindSpore directory."""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ixc25_ms.checkpoint import (ST_DTYPES, CheckpointError, SafetensorsFile, bf16_to_f32,
                                 f32_to_bf16, list_weight_files)
from ixc25_ms.config import IXCConfig
from ixc25_ms.ms_checkpoint import (CONVERSION_FILE, MS_INDEX, is_converted_dir, ms_numpy_dtype, read_index,
                                    read_ms_ckpt)
from ixc25_ms.param_spec import expected_parameters

from .mapping import UnknownKeyError, has_surgery, ms_to_official, official_to_ms, surgery_to_ms, \
    surgery_to_official

TOOL = "ixc25-convert"
TOOL_VERSION = "0.1.0"
TORCH_INDEX = "model.safetensors.index.json"
PARAM_TAGS = ("F32", "F16", "BF16")
TAG_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
               "fp32": "F32", "float32": "F32", "float": "F32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".index.json")
CAST_CHUNK = 1 << 24  # elements per cast step: bounds the temporaries of dtype casts
PARTIAL_TAG = ".ixc25-partial-"
OLD_TAG = ".ixc25-old-"


class ConversionError(CheckpointError):
    """The conversion cannot proceed; the message names the file and key."""


def parse_size(text: str) -> int:
    """'2GB' -> 2e9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = [("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
             ("KB", 10 ** 3), ("MB", 10 ** 6), ("GB", 10 ** 9), ("TB", 10 ** 12), ("K", 10 ** 3),
             ("M", 10 ** 6), ("G", 10 ** 9), ("B", 1)]
    for u, mult in units:
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        val = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (examples: 2GB, 500MB, 1GiB)") from None
    if val <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(val * mult)


def human(n: float) -> str:
    for u in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or u == "TB":
            return f"{n:.1f} {u}" if u != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n} B"


def dtype_tag(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ConversionError(f"unsupported --dtype {name!r} (bf16, fp16 or fp32)") from None


# ------------------------------------------------------------------------------------------ dtype casts
def cast_raw(arr: np.ndarray, src: str, dst: str, warn: Optional[List[str]] = None, key: str = "") -> np.ndarray:
    """Cast a raw float tensor (bf16 as uint16 bits) between F32/F16/BF16, chunked; same tag: unchanged."""
    if src == dst:
        return arr
    out = np.empty(arr.shape, dtype=ST_DTYPES[dst])
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    overflow = 0
    for i in range(0, flat_in.size, CAST_CHUNK):
        x = flat_in[i:i + CAST_CHUNK]
        x = bf16_to_f32(x) if src == "BF16" else x.astype(np.float32)
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


# ------------------------------------------------------------------------------------------ source files
class _StSource:
    """One safetensors file; tensors come as private read-only-in-practice memory maps (zero copy)."""
    kind = "safetensors"

    def __init__(self, path: str):
        self.path = path
        self.st = SafetensorsFile(path)
        self.entries = {k: (self.st.dtype_tag(k), self.st.shape(k)) for k in self.st.keys()}

    def read(self, key: str) -> np.ndarray:
        tag, shape, b, e = self.st.entries[key]
        dt = np.dtype(ST_DTYPES[tag])
        count = (e - b) // dt.itemsize
        if count == 0:
            return np.zeros(shape, dtype=dt)
        try:
            arr = np.memmap(self.path, dtype=dt, mode="c", offset=self.st.data_start + b, shape=(count,))
        except (OSError, ValueError) as ex:
            raise CheckpointError(f"{self.path}: cannot map key '{key}' ({ex})") from None
        arr = arr.reshape(shape)
        if not arr.flags.aligned:
            arr = np.array(arr)
        return arr

    def span(self, key: str) -> "Span":
        """The stored bytes of `key` as a file range (no read): copied by sendfile, hashed by pread."""
        _tag, _shape, b, e = self.st.entries[key]
        return Span(self.path, self.st.data_start + b, e - b)

    def close(self):
        pass


class _PickleSource:
    """One pytorch_model*.bin, loaded with torch.load(weights_only=True), memory-mapped where possible."""
    kind = "pickle"
    _TORCH_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                   "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}

    def __init__(self, path: str):
        self.path = path
        self.sd = None
        self._open()
        self.entries = {}
        for k, v in self.sd.items():
            tag = self._TORCH_TAGS.get(str(v.dtype).replace("torch.", ""), str(v.dtype))
            self.entries[k] = (tag, tuple(v.shape))
        self.sd = None

    def _open(self):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{self.path}: reading .bin checkpoints needs torch installed") from None
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:  # torch raises many types for corrupt or unsafe pickles
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{self.path}: cannot load pickle checkpoint ({type(e).__name__}: {msg})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{self.path}: not a state dict of tensors")
        self.sd = sd

    def read(self, key: str) -> np.ndarray:
        import torch
        if self.sd is None:
            self._open()
        v = self.sd[key].contiguous()
        if v.dtype == torch.bfloat16:
            return v.view(torch.int16).numpy().view(np.uint16)
        return v.numpy()

    def close(self):
        self.sd = None


class _MsCkptSource:
    """One MindSpore .ckpt shard of a converted directory; loaded whole on first read."""
    kind = "ckpt"

    def __init__(self, path: str, entries: Dict[str, Tuple[str, Tuple[int, ...]]]):
        self.path = path
        self.entries = entries
        self.data = None

    def read(self, key: str) -> np.ndarray:
        if self.data is None:
            self.data = read_ms_ckpt(self.path)
            if set(self.data) != set(self.entries):
                extra = sorted(set(self.data) ^ set(self.entries))
                raise CheckpointError(f"{self.path}: key '{extra[0]}' disagrees with {CONVERSION_FILE}")
        tag, arr = self.data[key]
        if (tag, tuple(arr.shape)) != self.entries[key]:
            raise CheckpointError(f"{self.path}: key '{key}' is {tag} {list(arr.shape)}, {CONVERSION_FILE} "
                                  f"records {self.entries[key][0]} {list(self.entries[key][1])}")
        return arr

    def close(self):
        self.data = None


def _check_index(index_path: str, sources) -> None:
    """Every key of every file listed in the index under that file, and nothing else."""
    try:
        with open(index_path, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index file ({e})") from None
    for s in sources:
        name = os.path.basename(s.path)
        for k in s.entries:
            if k not in wm:
                raise CheckpointError(f"{index_path}: key '{k}' of {name} is not in the index")
            if wm[k] != name:
                raise CheckpointError(f"{index_path}: key '{k}' is in {name}, the index says {wm[k]}")
    present = {k for s in sources for k in s.entries}
    for k, fn in wm.items():
        if k not in present:
            raise CheckpointError(f"{index_path}: key '{k}' is mapped to {fn} but that file has no such key")


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Item:
    source: object
    key: str                 # key in the source file
    tag: str                 # stored dtype tag
    shape: Tuple[int, ...]
    target: Optional[str]    # key written (None: dropped)
    out_tag: Optional[str] = None
    out_nbytes: int = 0
    expect_sha: Optional[str] = None  # sha256 of the stored bytes, when known (to-torch verification)


@dataclass
class Plan:
    direction: str
    src: str
    cfg_path: str
    items: List[Item]
    shards: List[List[Item]] = field(default_factory=list)
    extra_files: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    source_files: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.out_nbytes for i in self.items)


def _nbytes(shape, tag) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * TAG_SIZE[tag]


def _shard(items: List[Item], shard_size: int) -> List[List[Item]]:
    """Consecutive groups of at most shard_size output bytes (a larger tensor gets a shard of its own);
    dropped items ride with the shard current at their position."""
    shards, cur, size = [], [], 0
    for it in items:
        if it.target is not None and cur and size + it.out_nbytes > shard_size and size > 0:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.out_nbytes
    if cur:
        if shards and all(i.target is None for i in cur):
            shards[-1].extend(cur)
        else:
            shards.append(cur)
    return shards


def _extra_files(src_dir: str, exclude: set) -> Tuple[List[str], List[str]]:
    """Top-level regular files to copy (config, tokenizer, remote code...); sub-directories are skipped."""
    files, skipped = [], []
    for name in sorted(os.listdir(src_dir)):
        full = os.path.join(src_dir, name)
        if name.startswith(".") or name in exclude:
            continue
        if os.path.isdir(full):
            skipped.append(name + "/")
        elif os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES):
            files.append(name)
    return files, skipped


def _load_cfg(cfg_dir: str) -> Tuple[IXCConfig, str]:
    cfg_path = os.path.join(cfg_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{cfg_dir}: no config.json (needed to check every tensor's shape)")
    return IXCConfig.from_file(cfg_path), cfg_path


def _account(items: List[Item], expected: Dict[str, Tuple[int, ...]], cfg_path: str, where: str,
             official_of: Callable[[Item], str]) -> None:
    """Every expected parameter filled exactly once with the configured shape and a float dtype."""
    seen: Dict[str, str] = {}
    for it in items:
        if it.target is None:
            continue
        off = official_of(it)
        src = it.source.path
        if off in seen:
            raise ConversionError(f"{src}: key '{it.key}' fills '{off}', already filled from {seen[off]}")
        seen[off] = src
        if off not in expected:
            raise ConversionError(f"{src}: key '{it.key}' is not a parameter of the model {cfg_path} describes "
                                  f"(layer index, bias or vision key the config does not have)")
        if tuple(it.shape) != tuple(expected[off]):
            raise ConversionError(f"{src}: key '{it.key}' has shape {list(it.shape)}, {cfg_path} implies "
                                  f"{list(expected[off])}")
        if it.tag not in PARAM_TAGS:
            raise ConversionError(f"{src}: key '{it.key}' has unsupported dtype {it.tag} "
                                  f"(supported: {', '.join(PARAM_TAGS)})")
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ConversionError(f"{where}: {len(missing)} parameter(s) of {cfg_path} missing, first "
                              f"'{missing[0]}' {list(expected[missing[0]])}")


def _item(source, key: str, tag: str, shape, rename, out_tag: Optional[str]) -> Item:
    """One planned tensor: `rename` maps the key (None = drop); an unknown key is a clear error."""
    try:
        target = rename(key)
    except UnknownKeyError:
        raise ConversionError(f"{source.path}: unknown key '{key}' (no rule in converters/mapping.py "
                              f"KEY_TABLE)") from None
    it = Item(source, key, tag, tuple(shape), target)
    if target is not None:
        it.out_tag = out_tag or tag
        it.out_nbytes = _nbytes(shape, it.out_tag) if it.out_tag in TAG_SIZE else 0
    return it


def plan_to_ms(src: str, dtype: Optional[str] = None, shard_size: int = 2 * 10 ** 9,
               allow_pickle: bool = False) -> Plan:
    """Read headers only and check everything: official layout -> planned MindSpore shards."""
    src = os.path.abspath(src)
    out_tag = dtype_tag(dtype)
    if os.path.isfile(os.path.join(src, CONVERSION_FILE)):
        raise ConversionError(f"{src}: already converted by {TOOL} ({CONVERSION_FILE} present); "
                              f"use --to-torch to convert it back")
    files = list_weight_files(src, allow_pickle)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    cfg, cfg_path = _load_cfg(src_dir)
    sources = [_PickleSource(f) if f.endswith(".bin") else _StSource(f) for f in files]
    for idx in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isdir(src) and os.path.isfile(os.path.join(src, idx)):
            _check_index(os.path.join(src, idx), sources)
            break
    items, seen = [], {}
    for s in sources:
        for key, (tag, shape) in s.entries.items():
            if key in seen:
                raise ConversionError(f"{s.path}: key '{key}' also appears in {seen[key]}")
            seen[key] = s.path
            items.append(_item(s, key, tag, shape, official_to_ms, out_tag))
    _account(items, expected_parameters(cfg), cfg_path, src, lambda it: it.key)
    exclude = {os.path.basename(f) for f in files} | {CONVERSION_FILE}
    extra, skipped = _extra_files(src_dir, exclude) if os.path.isdir(src) else ([], [])
    if not os.path.isdir(src):
        extra = ["config.json"]
        for name in sorted(os.listdir(src_dir)):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
                extra.append(name)
    plan = Plan("official->mindspore", src, cfg_path, items, extra_files=extra, skipped=skipped,
                source_files=[os.path.basename(f) for f in files])
    plan.shards = _shard(items, shard_size)
    return plan


def plan_to_torch(src: str, dtype: Optional[str] = None, shard_size: int = 2 * 10 ** 9) -> Plan:
    """Read headers only and check everything: our MindSpore directory -> planned official shards."""
    src = os.path.abspath(src)
    out_tag = dtype_tag(dtype)
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such directory")
    if not is_converted_dir(src):
        raise ConversionError(f"{src}: not an {TOOL} output directory (no {CONVERSION_FILE} / {MS_INDEX}); "
                              f"--to-torch converts those back, drop it to convert an official checkpoint")
    fmt, wm = read_index(src)
    rec_path = os.path.join(src, CONVERSION_FILE)
    try:
        with open(rec_path, encoding="utf-8") as f:
            record = json.load(f)
        recorded = {t["target"]: t for t in record["tensors"] if t.get("target") not in (None, "dropped")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{rec_path}: not a valid conversion record ({e})") from None
    cfg, cfg_path = _load_cfg(src)
    by_file: Dict[str, List[str]] = {}
    for k, fn in wm.items():
        by_file.setdefault(fn, []).append(k)
    sources = []
    for fn, keys in by_file.items():
        full = os.path.join(src, fn)
        if fmt == "safetensors":
            s = _StSource(full)
        else:
            ents = {}
            for k in keys:
                if k not in recorded:
                    raise CheckpointError(f"{rec_path}: no record of key '{k}' (index maps it to {fn})")
                r = recorded[k]
                ents[k] = (r["dtype"], tuple(r.get("target_shape", r["shape"])))
            s = _MsCkptSource(full, ents)
        sources.append(s)
    if fmt == "safetensors":
        _check_index(os.path.join(src, MS_INDEX), sources)
    items = []
    for s in sources:
        for key, (tag, shape) in s.entries.items():
            it = _item(s, key, tag, shape, ms_to_official, out_tag)
            rec = recorded.get(key)
            if rec is not None and rec.get("dtype") == tag:
                it.expect_sha = rec.get("sha256")
            items.append(it)
    _account(items, expected_parameters(cfg), cfg_path, src, lambda it: it.target)
    exclude = set(wm.values()) | {CONVERSION_FILE, MS_INDEX}
    extra, skipped = _extra_files(src, exclude)
    plan = Plan("mindspore->official", src, cfg_path, items, extra_files=extra, skipped=skipped,
                source_files=sorted(by_file))
    plan.shards = _shard(items, shard_size)
    return plan


# ------------------------------------------------------------------------------------------ destination
def _free_space_check(dst: str, need: int, what: str) -> None:
    probe = os.path.dirname(dst)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or "/").free
    if free < need:
        raise ConversionError(f"{dst}: not enough free disk space on {probe}: need {human(need)} ({what}), "
                              f"{human(free)} free")


def _check_dst(src: str, dst: str, overwrite: bool) -> None:
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    src_dir = rs if os.path.isdir(rs) else os.path.dirname(rs)
    if rd == src_dir or rd.startswith(src_dir + os.sep) or src_dir.startswith(rd + os.sep):
        raise ConversionError(f"{dst}: destination must not be the source directory, inside it or around it")
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise ConversionError(f"{dst}: exists and is not a directory")
        if os.listdir(dst) and not overwrite:
            raise ConversionError(f"{dst}: directory is not empty; pass --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(dst: str) -> List[str]:
    """Remove leftovers of killed conversions into the same dst (their process is gone)."""
    parent, name = os.path.split(os.path.abspath(dst))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        for tag in (PARTIAL_TAG, OLD_TAG):
            prefix = f".{name}{tag}"
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                if not _pid_alive(int(entry[len(prefix):])):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                    removed.append(entry)
    return removed


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    """Rename the finished temp dir onto dst (replacing it only with overwrite)."""
    parent, name = os.path.split(os.path.abspath(dst))
    if os.path.lexists(dst):
        if os.listdir(dst):
            if not overwrite:
                raise ConversionError(f"{dst}: directory is not empty; pass --overwrite to replace it")
            old = os.path.join(parent, f".{name}{OLD_TAG}{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rmdir(dst)
            os.rename(tmp, dst)
    else:
        os.rename(tmp, dst)
    _fsync_path(parent)


# ------------------------------------------------------------------------------------------ write phase
IO_CHUNK = 8 << 20      # bytes per pread while hashing a file range apart from the writer
DIRECT_CHUNK = 16 << 20  # bytes per output buffer / write (64 MB x 4 writers: no better, more memory)
DIRECT_BUFFERS = 16      # buffers in flight (being filled, hashed, written): 256 MB
DIRECT_WRITERS = 8       # concurrent O_DIRECT writes (one synchronous write at a time is ~3x slower)
USE_DIRECT = os.environ.get("IXC25_CONVERT_DIRECT", "1") != "0"  # "0": buffered writes (page cache)
HASH_THREADS = max(1, min(2, os.cpu_count() or 1))
USE_KERNEL_COPY = os.environ.get("IXC25_CONVERT_COPY", "1") != "0"  # "0": always the buffer pipeline
COPY_CHUNK = 64 << 20    # bytes per copy_file_range call; the disk write of each is started right after it
# sha256 threads beside the kernel copy: they read the source ranges apart; on 2 cores a second one took CPU
# from the copy and was slower (notes/conversion.md, session 4)
COPY_HASH_THREADS = max(1, min(2, (os.cpu_count() or 1) - 1))
TRACE = bool(os.environ.get("IXC25_CONVERT_TRACE"))  # per-shard timings of the write pipeline on stderr
MS_TAG_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}  # safetensors' Dtype enum, descending


@dataclass
class Span:
    """A byte range of a file: the stored bytes of one source tensor."""
    path: str
    offset: int
    nbytes: int


@dataclass
class Out:
    """One tensor of an output shard: `data` (a Span copied in the kernel, an array written from memory, or
    None for a dropped tensor, hashed only) and `hashed` (what its sha256 is taken of)."""
    name: Optional[str]
    tag: Optional[str]
    shape: Tuple[int, ...]
    data: object
    hashed: object
    sha256: Optional[str] = None


_tls = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(bytearray(IO_CHUNK))
    return buf


def _truncated(span: Span, got: int) -> CheckpointError:
    return CheckpointError(f"{span.path}: truncated file: byte range [{span.offset}, {span.offset + span.nbytes}) "
                           f"ends early at byte {span.offset + got} (file changed during conversion?)")


def sha256_of(obj) -> str:
    """sha256 of an array's bytes, or of a file range read in IO_CHUNK steps (hashlib and preadv release the
    GIL, so several of these run in parallel with the writer)."""
    if not isinstance(obj, Span):
        return hashlib.sha256(memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))).hexdigest()
    h = hashlib.sha256()
    buf = _buffer()
    fd = os.open(obj.path, os.O_RDONLY)
    try:
        done = 0
        while done < obj.nbytes:
            n = os.preadv(fd, [buf[:min(IO_CHUNK, obj.nbytes - done)]], obj.offset + done)
            if n <= 0:
                raise _truncated(obj, done)
            h.update(buf[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def ms_order(outs: List[Out]) -> List[Out]:
    """The order mindspore.save_checkpoint(format='safetensors') writes (safetensors sorts by dtype, largest
    enum first, then by name), so our shards are byte-identical to MindSpore's."""
    return sorted((o for o in outs if o.data is not None), key=lambda o: (MS_TAG_ORDER[o.tag], o.name))


def write_stream(path: str, outs: List[Out], metadata: dict, hash_inline: bool = True) -> int:
    """Write a safetensors file of `outs` in the given order (dropped ones skipped); no fsync. Returns the size.

    When every tensor is a Span (its bytes pass through unchanged: the default conversion), the kernel copies
    them (`_copy_stream`, unless IXC25_CONVERT_COPY=0). Otherwise the byte stream (header, then every tensor) goes through DIRECT_BUFFERS page-aligned buffers of
    DIRECT_CHUNK bytes: the calling thread fills a buffer (pread from the source file for a Span, a memory
    copy for an array), hash threads feed the same buffer to the sha256 of each tensor it holds (with
    hash_inline, for every out whose `hashed` is its `data`: the digest lands in `out.sha256` and is the hash
    of the very bytes handed to the disk; HASH_THREADS threads, tensors dealt round-robin), and DIRECT_WRITERS threads pwrite it with O_DIRECT (no copy into
    the page cache, several writes in flight; plain buffered writes where the filesystem refuses O_DIRECT).
    The last block is padded to 4096 bytes and the file truncated to its size."""
    header, off = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}, 0
    segs: List[Tuple[object, Optional[Out]]] = []
    for o in outs:
        if o.data is None:
            continue
        n = o.data.nbytes
        header[o.name] = {"dtype": o.tag, "shape": list(o.shape), "data_offsets": [off, off + n]}
        off += n
        segs.append((o.data if isinstance(o.data, Span) else
                     memoryview(np.ascontiguousarray(o.data).reshape(-1).view(np.uint8)), o))
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    segs.insert(0, (memoryview(len(hb).to_bytes(8, "little") + hb), None))
    total = 8 + len(hb) + off
    if USE_KERNEL_COPY and all(isinstance(d, Span) for d, _ in segs[1:]):
        hash_outs = [o for _, o in segs[1:] if hash_inline and o.hashed is o.data]
        if _copy_stream(path, bytes(segs[0][0]), [o for _, o in segs[1:]], hash_outs, total):
            return _check_size(path, total)
    hashers = {id(o): hashlib.sha256() for _, o in segs
               if o is not None and hash_inline and o.hashed is o.data}

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = USE_DIRECT and hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
    except OSError as e:
        if not direct or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        direct = False
        fd = os.open(path, flags, 0o644)
    nbuf = max(1, min(DIRECT_BUFFERS, -(-total // DIRECT_CHUNK)))
    bufs = [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(nbuf)]
    free: "queue.Queue[int]" = queue.Queue()
    for i in range(nbuf):
        free.put(i)
    hqs: List[queue.Queue] = [queue.Queue() for _ in range(HASH_THREADS)]
    wq: queue.Queue = queue.Queue()
    owner = {id(o): k % HASH_THREADS for k, (_, o) in enumerate(segs)}  # a tensor's pieces stay in order
    pending = [0] * nbuf
    lock = threading.Lock()
    errors: List[BaseException] = []
    busy = {"wait_free": 0.0, "fill": 0.0, "hash": 0.0, "write": 0.0}  # seconds, for IXC25_CONVERT_TRACE

    def release(i: int) -> None:
        with lock:
            pending[i] -= 1
            last = pending[i] == 0
        if last:
            free.put(i)

    def hash_loop(hq: queue.Queue) -> None:
        while True:
            job = hq.get()
            if job is None:
                return
            i, pieces = job
            try:
                if not errors:
                    t0 = time.perf_counter()
                    mv = memoryview(bufs[i])
                    for h, a, b in pieces:
                        h.update(mv[a:b])
                    busy["hash"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)
            finally:
                release(i)

    def write_loop() -> None:
        while True:
            job = wq.get()
            if job is None:
                return
            i, at, n = job
            try:
                if not errors:
                    t0 = time.perf_counter()
                    _pwrite_all(fd, memoryview(bufs[i])[:n], at, path)
                    busy["write"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)
            finally:
                release(i)

    threads = [threading.Thread(target=hash_loop, args=(hq,), name="ixc25-sha256", daemon=True) for hq in hqs]
    threads += [threading.Thread(target=write_loop, name="ixc25-write", daemon=True)
                for _ in range(DIRECT_WRITERS)]
    for t in threads:
        t.start()
    fds: Dict[str, int] = {}
    try:
        seg_i, seg_pos, at = 0, 0, 0
        t_start = time.perf_counter()
        while at < total:
            t0 = time.perf_counter()
            i = free.get()
            t1 = time.perf_counter()
            busy["wait_free"] += t1 - t0
            if errors:
                break
            buf = memoryview(bufs[i])
            n, a, pieces = min(DIRECT_CHUNK, total - at), 0, [[] for _ in hqs]
            while a < n:
                data, o = segs[seg_i]
                take = min(n - a, data.nbytes - seg_pos)
                if isinstance(data, Span):
                    _pread_into(buf[a:a + take], data, seg_pos, fds)
                elif take:
                    buf[a:a + take] = data[seg_pos:seg_pos + take]
                if take and o is not None and id(o) in hashers:
                    pieces[owner[id(o)]].append((hashers[id(o)], a, a + take))
                a += take
                seg_pos += take
                if seg_pos == data.nbytes:
                    seg_i, seg_pos = seg_i + 1, 0
            busy["fill"] += time.perf_counter() - t1
            wn = -(-n // 4096) * 4096 if direct else n
            if wn > n:
                buf[n:wn] = bytes(wn - n)
            pending[i] = 1 + len(hqs)
            for hq, pc in zip(hqs, pieces):
                hq.put((i, pc))
            wq.put((i, at, wn))
            at += n
    except BaseException as e:
        errors.append(e)
    finally:
        for hq in hqs:
            hq.put(None)
        for _ in range(DIRECT_WRITERS):
            wq.put(None)
        for t in threads:
            t.join()
        for f in fds.values():
            os.close(f)
        try:
            if not errors:
                os.ftruncate(fd, total)
        finally:
            os.close(fd)
    if errors:
        raise errors[0]
    if TRACE:
        print(f"[trace] {os.path.basename(path)}: {total / 1e6:.0f} MB in {time.perf_counter() - t_start:.2f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in busy.items())
              + f" (hash/write summed over {HASH_THREADS}/{DIRECT_WRITERS} threads)", file=sys.stderr)
    for _, o in segs:
        if o is not None and id(o) in hashers:
            o.sha256 = hashers[id(o)].hexdigest()
    return _check_size(path, total)


def _check_size(path: str, total: int) -> int:
    size = os.path.getsize(path)
    if size != total:
        raise ConversionError(f"{path}: wrote {size} bytes, expected {total}")
    return size


def _runs(spans: List[Span]) -> List[Span]:
    """Consecutive spans that continue each other in the same file merged into one (one kernel copy each)."""
    out: List[Span] = []
    for sp in spans:
        if not sp.nbytes:
            continue
        if out and out[-1].path == sp.path and out[-1].offset + out[-1].nbytes == sp.offset:
            out[-1] = Span(sp.path, out[-1].offset, out[-1].nbytes + sp.nbytes)
        else:
            out.append(Span(sp.path, sp.offset, sp.nbytes))
    return out


_SYNC_FILE_RANGE = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start, without waiting for it, the disk write of [offset, offset + nbytes) of fd: sync_file_range(
    SYNC_FILE_RANGE_WRITE) through ctypes (Python's os lacks it), else posix_fadvise(DONTNEED), which starts
    it too. Without this the kernel leaves the disk idle until 10 % of memory is dirty."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            import ctypes
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            f.restype = ctypes.c_int
            _SYNC_FILE_RANGE = f
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    if _SYNC_FILE_RANGE and _SYNC_FILE_RANGE(fd, offset, nbytes, 2) == 0:  # 2: SYNC_FILE_RANGE_WRITE
        return
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY)


def _copy_range(span: Span, fds: Dict[str, int], fd: int, at: int, path: str,
                on_first: Optional[Callable[[], None]]) -> bool:
    """Copy the span to fd (the file `path`) at `at` in the kernel (copy_file_range, COPY_CHUNK at a time, the
    disk write of each chunk started at once); `fds` holds the open source files. With `on_first` (called
    after the first chunk is copied): False if the kernel refuses that first call (the caller falls back)."""
    src_fd = fds.get(span.path)
    if src_fd is None:
        src_fd = fds[span.path] = os.open(span.path, os.O_RDONLY)
    done = 0
    while done < span.nbytes:
        try:
            k = os.copy_file_range(src_fd, fd, min(COPY_CHUNK, span.nbytes - done), span.offset + done, at + done)
        except OSError as e:
            if on_first is not None and e.errno in _NO_KERNEL_COPY:
                return False
            raise
        if on_first is not None:
            on_first()
            on_first = None
        if k == 0:  # end of file, or a filesystem that copies nothing: the rest through user space (a file that
            buf = _buffer()  # ends early is reported as truncated by _pread_into)
            while done < span.nbytes:
                n = min(len(buf), span.nbytes - done)
                _pread_into(buf[:n], span, done, fds)
                _pwrite_all(fd, buf[:n], at + done, path)
                done += n
            return True
        _start_writeback(fd, at + done, k)
        done += k
    return True


def _pwrite_all(fd: int, data, at: int, path: str) -> None:
    """All of `data` at offset `at` of fd (the file `path`), short writes continued."""
    done = 0
    while done < len(data):
        k = os.pwrite(fd, data[done:], at + done)
        if k <= 0:
            raise OSError(errno.EIO, "short write", path)
        done += k


def _copy_stream(path: str, head: bytes, outs: List[Out], hash_outs: List[Out], total: int) -> bool:
    """write_stream's path when every tensor passes through unchanged (the default conversion): the header
    from memory, then the tensors as runs of source bytes copied by the kernel (copy_file_range, page cache to
    page cache, as `cp` does, with each chunk's disk write started at once), while COPY_HASH_THREADS threads
    take the sha256 of each tensor's source range. False, with nothing kept, where the kernel refuses such
    copies (another filesystem): the caller then streams through its buffers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fds: Dict[str, int] = {}
    errors: List[BaseException] = []
    jobs: "queue.Queue[Out]" = queue.Queue()
    busy = {"copy": 0.0, "hash": 0.0}
    threads: List[threading.Thread] = []

    def hash_loop() -> None:
        while not errors:
            try:
                o = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                t0 = time.perf_counter()
                o.sha256 = sha256_of(o.data)
                busy["hash"] += time.perf_counter() - t0
            except BaseException as e:  # surfaced by the caller
                errors.append(e)

    def start_hashing() -> None:  # the kernel copies: hash beside it
        for o in hash_outs:
            jobs.put(o)
        threads.extend(threading.Thread(target=hash_loop, name="ixc25-sha256", daemon=True)
                       for _ in range(COPY_HASH_THREADS))
        for t in threads:
            t.start()

    t_start = time.perf_counter()
    try:
        _pwrite_all(fd, head, 0, path)
        at = len(head)
        for run in _runs([o.data for o in outs]):
            if not _copy_range(run, fds, fd, at, path, None if threads else start_hashing):
                return False
            at += run.nbytes
            if errors:
                break
        busy["copy"] = time.perf_counter() - t_start
        if not threads:  # nothing was copied (empty tensors only)
            for o in hash_outs:
                o.sha256 = sha256_of(o.data)
    except BaseException as e:
        errors.append(e)
    finally:
        for t in threads:
            t.join()
        for f in fds.values():
            os.close(f)
        os.close(fd)
    if errors:
        raise errors[0]
    if TRACE:
        print(f"[trace] {os.path.basename(path)}: {total / 1e6:.0f} MB in {time.perf_counter() - t_start:.2f} s "
              f"(kernel copy); copy {busy['copy']:.2f} s, hash {busy['hash']:.2f} s summed over "
              f"{COPY_HASH_THREADS} thread(s)", file=sys.stderr)
    return True


def _pread_into(dst: memoryview, span: Span, pos: int, fds: Dict[str, int]) -> None:
    fd = fds.get(span.path)
    if fd is None:
        fd = fds[span.path] = os.open(span.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
    done = 0
    while done < len(dst):
        k = os.preadv(fd, [dst[done:]], span.offset + pos + done)
        if k <= 0:
            raise _truncated(span, pos + done)
        done += k


def _save_ms_shard(outs: List[Out], path: str, fmt: str) -> None:
    """One MindSpore shard (tests patch this to simulate failures). safetensors: written here, byte for byte
    what mindspore.save_checkpoint(format='safetensors') writes, without importing MindSpore or copying the
    tensors through user space; ckpt: through mindspore.save_checkpoint."""
    if fmt == "safetensors":
        write_stream(path, ms_order(outs), {"format": "ms"})
        return
    import mindspore as ms
    tensors = []
    for o in outs:
        if o.data is None:
            continue
        arr = o.data if not isinstance(o.data, Span) else _read_span(o.data, o.tag, o.shape)
        tensors.append({"name": o.name, "data": ms.Tensor.from_numpy(arr.view(ms_numpy_dtype(o.tag)))})
    ms.save_checkpoint(tensors, path, format=fmt)


def _read_span(span: Span, tag: str, shape) -> np.ndarray:
    dt = np.dtype(ST_DTYPES[tag])
    if span.nbytes == 0:
        return np.zeros(shape, dtype=dt)
    arr = np.memmap(span.path, dtype=dt, mode="c", offset=span.offset, shape=(span.nbytes // dt.itemsize,))
    arr = arr.reshape(shape)
    return arr if arr.flags.aligned else np.array(arr)


class _Hasher:
    """sha256 of shard tensors on HASH_THREADS threads, overlapping the writer (one shard in flight)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="ixc25-sha256")

    def start(self, outs: List[Out], separate: List[Out], tick=None) -> Callable[[bool], List[str]]:
        """Hash the outs in `separate` (in that order) on the pool while the shard is written; the returned
        function waits and gives the digests in the order of `outs`, taking `out.sha256` (set by the writer)
        for the others; given True it cancels instead."""
        def one(o):
            d = sha256_of(o.hashed)
            if tick:
                tick()
            return d
        fut = {id(o): self.pool.submit(one, o) for o in separate}

        def wait(cancel: bool = False) -> List[str]:
            if cancel:
                for f in fut.values():
                    f.cancel()
                return []
            try:
                got = []
                for o in outs:
                    if id(o) in fut:
                        got.append(fut[id(o)].result())
                    else:
                        if o.sha256 is None:
                            raise ConversionError(f"internal error: no sha256 for '{o.name}'")
                        got.append(o.sha256)
                        if tick:
                            tick()
                return got
            except BaseException:
                for f in fut.values():
                    f.cancel()
                raise
        return wait

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Syncer:
    """fsync finished shards in one background thread, overlapping the work on the next shard."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ixc25-fsync")
        self.futures = []

    def add(self, path: str) -> None:
        self.futures.append(self.pool.submit(_fsync_path, path))

    def join(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def write_safetensors_file(path: str, tensors: List[Tuple[str, str, np.ndarray]], metadata: dict,
                           fsync: bool = True) -> None:
    """Safetensors without copying the tensors: [(name, tag, raw array)] written in order (then fsync)."""
    header, off = {}, 0
    for name, tag, arr in tensors:
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _, _, arr in tensors:
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        if fsync:
            f.flush()
            os.fsync(f.fileno())


class _Progress:
    """Overall bar in bytes plus one bar per shard (tqdm, on stderr); cleared without trace on failure."""

    def __init__(self, total: int, quiet: bool, desc: str):
        self.quiet = quiet
        self.bar = self.sub = None
        if not quiet:
            from tqdm import tqdm
            self._tqdm = tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, position=0)

    def shard(self, n_items: int, desc: str):
        self.end_shard()
        if not self.quiet:
            self.sub = self._tqdm(total=n_items, unit="tensor", desc=desc, leave=False, position=1)

    def tick(self, _i: int = 0):
        if self.sub is not None:
            self.sub.update(1)

    def end_shard(self, nbytes: int = 0):
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self, ok: bool):
        self.end_shard()
        if self.bar is not None:
            self.bar.leave = ok
            self.bar.close()


def _source_out(it: Item, warnings: List[str]) -> Tuple[object, object]:
    """(data, hashed) of one to-MindSpore item: the source byte range itself when the bytes pass through
    unchanged (no cast, no surgery, safetensors source), else the converted array (hashed as written)."""
    span = it.source.span(it.key) if isinstance(it.source, _StSource) else None
    passthrough = it.target is None or (it.out_tag == it.tag and not has_surgery(it.target))
    if span is not None and passthrough:
        return (None if it.target is None else span), span
    raw = it.source.read(it.key)
    if it.target is None:
        return None, raw
    arr = cast_raw(raw, it.tag, it.out_tag, warnings, it.key)
    del raw
    if has_surgery(it.target):
        arr = surgery_to_ms(it.target, arr)
    return arr, arr


def _run_shards(plan: Plan, tmp: str, quiet: bool, label: str, fname_of, write_shard) -> None:
    """Shared shard loop of both directions: progress, hashing thread, background fsync, closing each source
    after its last shard. `write_shard(si, shard, fname, path, hasher, prog)` builds and writes one shard."""
    n = len(plan.shards)
    last_use = {id(it.source): si for si, shard in enumerate(plan.shards) for it in shard}
    prog = _Progress(plan.total_bytes, quiet, label)
    syncer = _Syncer()
    hasher = _Hasher()
    ok = False
    try:
        for si, shard in enumerate(plan.shards):
            fname = fname_of(si, n)
            path = os.path.join(tmp, fname)
            prog.shard(len(shard), f"shard {si + 1}/{n}")
            write_shard(si, shard, fname, path, hasher, prog)
            syncer.add(path)
            for it in shard:
                if last_use.get(id(it.source)) == si:
                    it.source.close()
            prog.end_shard(sum(it.out_nbytes for it in shard))
        ok = True
    finally:
        try:
            hasher.close()
            syncer.join()
        finally:
            prog.close(ok)


def _hash_and_write(hasher, prog, outs, to_hash, write) -> list:
    """Write one shard while its tensors are hashed on the hashing thread; returns the digests."""
    wait = hasher.start(outs, to_hash, prog.tick)
    try:
        write()
    except BaseException:
        wait(True)
        raise
    return wait()


def _write_to_ms(plan: Plan, tmp: str, fmt: str, quiet: bool, warnings: List[str]) -> Tuple[dict, List[dict]]:
    ext = "safetensors" if fmt == "safetensors" else "ckpt"
    weight_map, records = {}, []

    def write_shard(si, shard, fname, path, hasher, prog):
        outs = []
        for it in shard:
            data, hashed = _source_out(it, warnings)
            shape = tuple(data.shape) if isinstance(data, np.ndarray) else it.shape
            outs.append(Out(it.target, it.out_tag, shape, data, hashed))
        inline = fmt == "safetensors"  # our writer hashes what it writes; the ckpt path is hashed apart
        to_hash = [o for o in outs if not (inline and o.data is not None and o.hashed is o.data)]
        digests = _hash_and_write(hasher, prog, outs, to_hash, lambda: _save_ms_shard(outs, path, fmt))
        if fmt == "safetensors":
            _verify_written(path, [(o.name, o.tag, o.shape) for o in outs if o.data is not None])
        for it, o, dg in zip(shard, outs, digests):
            rec = {"source_key": it.key, "source_file": os.path.basename(it.source.path),
                   "source_dtype": it.tag, "shape": list(it.shape)}
            if it.target is None:
                rec.update(target="dropped", sha256=dg)
            else:
                weight_map[it.target] = fname
                rec.update(target=it.target, target_file=fname, dtype=it.out_tag,
                           target_shape=list(o.shape), sha256=dg)
            records.append(rec)

    _run_shards(plan, tmp, quiet, "convert", lambda si, n: f"ms_model-{si + 1:05d}-of-{n:05d}.{ext}", write_shard)
    return weight_map, records


def _verify_written(path: str, want: List[Tuple[str, str, Tuple[int, ...]]]) -> None:
    st = SafetensorsFile(path)
    got = {k: (st.dtype_tag(k), st.shape(k)) for k in st.keys()}
    exp = {k: (t, tuple(s)) for k, t, s in want}
    if got != exp:
        bad = sorted(set(got.items()) ^ set(exp.items()))
        raise ConversionError(f"{path}: written shard disagrees with the plan at key '{bad[0][0]}'")


def _write_to_torch(plan: Plan, tmp: str, quiet: bool, warnings: List[str]) -> dict:
    weight_map = {}

    def write_shard(si, shard, fname, path, hasher, prog):
        outs = []
        for it in shard:  # the stored bytes are hashed (checked against conversion.json)
            span = it.source.span(it.key) if isinstance(it.source, _StSource) else None
            if span is not None and it.out_tag == it.tag and not has_surgery(it.key):
                outs.append(Out(it.target, it.out_tag, it.shape, span, span))
                continue
            raw = it.source.read(it.key)
            arr = surgery_to_official(it.key, raw) if has_surgery(it.key) else raw
            arr = cast_raw(arr, it.tag, it.out_tag, warnings, it.key)
            outs.append(Out(it.target, it.out_tag, tuple(arr.shape), arr, span or raw))
        digests = _hash_and_write(hasher, prog, outs, [o for o in outs if o.hashed is not o.data],
                                  lambda: write_stream(path, outs, {"format": "pt"}))
        for it, dg in zip(shard, digests):
            if it.expect_sha is not None and dg != it.expect_sha:
                raise ConversionError(f"{it.source.path}: key '{it.key}' does not match the sha256 in "
                                      f"{CONVERSION_FILE} (file corrupted after conversion?)")
            weight_map[it.target] = fname

    _run_shards(plan, tmp, quiet, "to-torch", lambda si, n: f"model-{si + 1:05d}-of-{n:05d}.safetensors", write_shard)
    return weight_map


def _mindspore_version() -> str:
    """Without importing MindSpore (~2.5 s) when its package metadata is there."""
    try:
        from importlib.metadata import version
        return version("mindspore")
    except Exception:  # metadata missing: ask the module itself
        import mindspore as ms
        return ms.__version__


def _copy_extra(plan: Plan, tmp: str) -> None:
    src_dir = plan.src if os.path.isdir(plan.src) else os.path.dirname(plan.src)
    for name in plan.extra_files:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))


def _extra_bytes(plan: Plan) -> int:
    src_dir = plan.src if os.path.isdir(plan.src) else os.path.dirname(plan.src)
    return sum(os.path.getsize(os.path.join(src_dir, f)) for f in plan.extra_files)


def _run(plan: Plan, dst: str, overwrite: bool, quiet: bool, write: Callable[[str, List[str]], dict]) -> dict:
    """Checks, temp dir next to dst, write, publish by rename; on any failure the temp dir is removed."""
    dst = os.path.abspath(dst)
    _check_dst(plan.src, dst, overwrite)
    weights = plan.total_bytes
    overhead = 4096 * (len(plan.shards) + 4) + 600 * len(plan.items) + _extra_bytes(plan)
    _free_space_check(dst, weights + overhead, f"{human(weights)} of weights + {human(overhead)} of other files")
    _clean_stale(dst)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}{PARTIAL_TAG}{os.getpid()}")
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        warnings: List[str] = []
        summary = write(tmp, warnings)
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o444)
        _fsync_path(tmp)
        _publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["warnings"] = warnings
    if warnings and not quiet:
        for w in warnings:
            print(f"{TOOL}: warning: {w}", file=sys.stderr)
    return summary


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def convert_to_ms(src: str, dst: str, dtype: Optional[str] = None, fmt: str = "safetensors",
                  shard_size: int = 2 * 10 ** 9, allow_pickle: bool = False, overwrite: bool = False,
                  quiet: bool = True) -> dict:
    """Official checkpoint (file or dir) -> MindSpore shards + ms_model.index.json + conversion.json."""
    if fmt not in ("safetensors", "ckpt"):
        raise ConversionError(f"unsupported --format {fmt!r} (safetensors or ckpt)")
    t0 = time.time()
    plan = plan_to_ms(src, dtype, shard_size, allow_pickle)
    t_plan = time.time() - t0

    def write(tmp: str, warnings: List[str]) -> dict:
        t1 = time.time()
        weight_map, records = _write_to_ms(plan, tmp, fmt, quiet, warnings)
        t_write = time.time() - t1
        _copy_extra(plan, tmp)
        total = plan.total_bytes
        _write_json(os.path.join(tmp, MS_INDEX), {
            "metadata": {"format": fmt, "total_size": total, "tool": f"{TOOL} {TOOL_VERSION}"},
            "weight_map": weight_map})
        out_dtypes = sorted({it.out_tag for it in plan.items if it.target is not None})
        summary = {
            "tool": TOOL, "tool_version": TOOL_VERSION, "mindspore_version": _mindspore_version(),
            "numpy_version": np.__version__, "direction": plan.direction, "source": plan.src,
            "source_files": plan.source_files, "config": os.path.basename(plan.cfg_path), "format": fmt,
            "dtype": dtype_tag(dtype) or "source", "output_dtypes": out_dtypes, "shard_size": shard_size,
            "num_shards": len(plan.shards), "total_size": total,
            "num_converted": sum(1 for r in records if r["target"] != "dropped"),
            "num_dropped": sum(1 for r in records if r["target"] == "dropped"),
            "copied_files": plan.extra_files, "skipped": plan.skipped, "warnings": warnings,
            "seconds": {"plan": round(t_plan, 3), "write": round(t_write, 3)},
            "tensors": records,
        }
        _write_json(os.path.join(tmp, CONVERSION_FILE), summary)
        return {k: v for k, v in summary.items() if k != "tensors"}

    return _run(plan, dst, overwrite, quiet, write)


def convert_to_torch(src: str, dst: str, dtype: Optional[str] = None, shard_size: int = 2 * 10 ** 9,
                     overwrite: bool = False, quiet: bool = True) -> dict:
    """Our MindSpore directory -> official layout (model-*.safetensors + model.safetensors.index.json)."""
    t0 = time.time()
    plan = plan_to_torch(src, dtype, shard_size)
    t_plan = time.time() - t0

    def write(tmp: str, warnings: List[str]) -> dict:
        t1 = time.time()
        weight_map = _write_to_torch(plan, tmp, quiet, warnings)
        t_write = time.time() - t1
        _copy_extra(plan, tmp)
        _write_json(os.path.join(tmp, TORCH_INDEX), {"metadata": {"total_size": plan.total_bytes},
                                                     "weight_map": dict(sorted(weight_map.items()))})
        return {"tool": TOOL, "tool_version": TOOL_VERSION, "direction": plan.direction, "source": plan.src,
                "num_shards": len(plan.shards), "total_size": plan.total_bytes,
                "num_converted": len(weight_map), "num_dropped": 0, "copied_files": plan.extra_files,
                "skipped": plan.skipped, "seconds": {"plan": round(t_plan, 3), "write": round(t_write, 3)}}

    return _run(plan, dst, overwrite, quiet, write)

"""The conversion plan, from headers alone: every tensor accounted for against the config before any write."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ixc25_ms.config import IXCConfig
from ixc25_ms.weights.keys import UnknownKeyError, ms_to_official, official_to_ms
from ixc25_ms.weights.layout import CONVERSION_FILE, MS_INDEX, is_converted_dir, open_weights, read_records
from ixc25_ms.weights.sources import WeightSource
from ixc25_ms.weights.spec import expected_parameters
from ixc25_ms.weights.tags import tag_size

from .units import PARAM_TAGS, TOOL, ConversionError, dtype_tag

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".index.json")


@dataclass
class Item:
    source: WeightSource
    key: str                 # key in the source
    tag: str                 # stored dtype tag
    shape: Tuple[int, ...]
    target: Optional[str]    # key written (None: dropped)
    out_tag: Optional[str] = None
    out_nbytes: int = 0
    expect_sha: Optional[str] = None  # sha256 of the stored bytes, when known (to-torch verification)
    quantize: Optional[str] = None    # "int8": written as int8 codes + `<target>_scale` (fp32, per row)

    @property
    def source_file(self) -> str:
        return self.source.file_of(self.key)


@dataclass
class Plan:
    direction: str
    src: str
    cfg_path: str
    source: WeightSource
    items: List[Item]
    shards: List[List[Item]] = field(default_factory=list)
    extra_files: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    source_files: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.out_nbytes for i in self.items)

    @property
    def src_dir(self) -> str:
        return self.src if os.path.isdir(self.src) else os.path.dirname(self.src)


def _nbytes(shape, tag) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * tag_size(tag)


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
        src = it.source_file
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


def _items(source: WeightSource, rename: Callable[[str], Optional[str]], out_tag: Optional[str]) -> List[Item]:
    """One planned tensor per source key: `rename` maps the key (None = drop); an unknown key is a clear error."""
    items = []
    for key in source.keys():
        tag, shape = source.dtype_tag(key), source.shape(key)
        try:
            target = rename(key)
        except UnknownKeyError:
            raise ConversionError(f"{source.file_of(key)}: unknown key '{key}' (no rule in "
                                  f"ixc25_ms/weights/keys.py KEY_TABLE)") from None
        it = Item(source, key, tag, tuple(shape), target)
        if target is not None:
            it.out_tag = out_tag or tag
            it.out_nbytes = _nbytes(shape, it.out_tag) if it.out_tag in PARAM_TAGS else 0
        items.append(it)
    return items


def _plan_quantize(items: List[Item], quantize: Optional[str]) -> None:
    """Mark the base weights of the LLM linears and the output head for int8 (codes + one fp32 scale per row)."""
    if quantize is None:
        return
    if quantize != "int8":
        raise ConversionError(f"unsupported --quantize {quantize!r} (int8)")
    from ixc25_ms.quantize.int8 import is_quantized_key
    for it in items:
        if it.target is not None and is_quantized_key(it.target):
            it.quantize, it.out_tag = quantize, "I8"
            it.out_nbytes = _nbytes(it.shape, "I8") + 4 * it.shape[0]


def plan_to_ms(src: str, dtype: Optional[str] = None, shard_size: int = 2 * 10 ** 9,
               allow_pickle: bool = False, quantize: Optional[str] = None) -> Plan:
    """Read headers only and check everything: official layout -> planned MindSpore shards (with quantize
    "int8", the LLM's base weights and the output head as int8 codes + per-row scales)."""
    src = os.path.abspath(src)
    out_tag = dtype_tag(dtype)
    if is_converted_dir(src):
        raise ConversionError(f"{src}: already converted by {TOOL} ({CONVERSION_FILE} present); "
                              f"use --to-torch to convert it back")
    source = open_weights(src, allow_pickle)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    cfg, cfg_path = _load_cfg(src_dir)
    items = _items(source, official_to_ms, out_tag)
    _account(items, expected_parameters(cfg), cfg_path, src, lambda it: it.key)
    _plan_quantize(items, quantize)
    names = [os.path.basename(f) for f in source.files]
    if os.path.isdir(src):
        extra, skipped = _extra_files(src_dir, set(names) | {CONVERSION_FILE})
    else:
        extra, skipped = ["config.json"], []
        for name in sorted(os.listdir(src_dir)):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
                extra.append(name)
    plan = Plan("official->mindspore", src, cfg_path, source, items, extra_files=extra, skipped=skipped,
                source_files=names)
    plan.shards = _shard(items, shard_size)
    return plan


def _recorded_quantization(src: str) -> Optional[str]:
    """The "quantize" entry of a converted directory's conversion.json (None when absent)."""
    path = os.path.join(src, CONVERSION_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return record.get("quantize") if isinstance(record, dict) else None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not a valid conversion record ({e})") from None


def plan_to_torch(src: str, dtype: Optional[str] = None, shard_size: int = 2 * 10 ** 9) -> Plan:
    """Read headers only and check everything: our MindSpore directory -> planned official shards."""
    src = os.path.abspath(src)
    out_tag = dtype_tag(dtype)
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such directory")
    if not is_converted_dir(src):
        raise ConversionError(f"{src}: not an {TOOL} output directory (no {CONVERSION_FILE} / {MS_INDEX}); "
                              f"--to-torch converts those back, drop it to convert an official checkpoint")
    quantized = _recorded_quantization(src)
    if quantized:
        raise ConversionError(f"{src}: holds {quantized} weights (ixc25-convert --quantize); quantisation is lossy, "
                              f"so --to-torch takes unquantised directories only: convert the official checkpoint")
    source = open_weights(src)
    recorded = read_records(src)
    cfg, cfg_path = _load_cfg(src)
    items = _items(source, ms_to_official, out_tag)
    for it in items:
        rec = recorded.get(it.key)
        if rec is not None and rec.get("dtype") == it.tag:
            it.expect_sha = rec.get("sha256")
    _account(items, expected_parameters(cfg), cfg_path, src, lambda it: it.target)
    names = [os.path.basename(f) for f in source.files]
    extra, skipped = _extra_files(src, set(names) | {CONVERSION_FILE, MS_INDEX})
    plan = Plan("mindspore->official", src, cfg_path, source, items, extra_files=extra, skipped=skipped,
                source_files=sorted(names))
    plan.shards = _shard(items, shard_size)
    return plan

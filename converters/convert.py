"""The two directions of ixc25-convert: official checkpoint -> our MindSpore directory, and back (--to-torch)."""
from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

import numpy as np

from ixc25_ms.weights.keys import has_surgery, surgery_to_ms, surgery_to_official
from ixc25_ms.weights.layout import CONVERSION_FILE, MS_INDEX, TORCH_INDEX
from ixc25_ms.weights.tags import cast_raw

from . import shards
from .fastio import Out
from .outdir import copy_extra, run_atomic, write_json
from .pipeline import write_stream
from .plan import Item, Plan, plan_to_ms, plan_to_torch
from .units import TOOL, TOOL_VERSION, ConversionError, dtype_tag


def _source_out(it: Item, warnings: List[str]) -> Tuple[object, object]:
    """(data, hashed) of one to-MindSpore item: the source byte range itself when the bytes pass through
    unchanged (no cast, no surgery, safetensors source), else the converted array (hashed as written)."""
    span = it.source.span(it.key)
    passthrough = it.target is None or (it.out_tag == it.tag and not has_surgery(it.target))
    if span is not None and passthrough:
        return (None if it.target is None else span), span
    raw = it.source.read(it.key, None)
    if it.target is None:
        return None, raw
    arr = cast_raw(raw, it.tag, it.out_tag, warnings, it.key)
    del raw
    if has_surgery(it.target):
        arr = surgery_to_ms(it.target, arr)
    return arr, arr


def _quantized_outs(it: Item) -> List[Out]:
    """The int8 codes and the per-row fp32 scales of one base weight (ixc25_ms.quantize.int8)."""
    from ixc25_ms.quantize.int8 import SCALE_SUFFIX, quantize_int8
    raw = it.source.read(it.key, None)
    q, scale = quantize_int8(raw, it.tag)
    del raw
    return [Out(it.target, "I8", tuple(q.shape), q, q),
            Out(it.target + SCALE_SUFFIX, "F32", tuple(scale.shape), scale, scale)]


def _write_to_ms(plan: Plan, tmp: str, fmt: str, quiet: bool, warnings: List[str]) -> Tuple[dict, List[dict]]:
    ext = "safetensors" if fmt == "safetensors" else "ckpt"
    weight_map, records = {}, []

    def write_shard(si, shard, fname, path, hasher, prog):
        groups = []  # per item: its outs (a quantised weight has two: codes and scales)
        for it in shard:
            if it.quantize:
                groups.append(_quantized_outs(it))
                continue
            data, hashed = _source_out(it, warnings)
            shape = tuple(data.shape) if isinstance(data, np.ndarray) else it.shape
            groups.append([Out(it.target, it.out_tag, shape, data, hashed)])
        outs = [o for g in groups for o in g]
        inline = fmt == "safetensors"  # our writer hashes what it writes; the ckpt path is hashed apart
        to_hash = [o for o in outs if not (inline and o.data is not None and o.hashed is o.data)]
        digests = iter(shards.hash_and_write(hasher, prog, outs, to_hash,
                                             lambda: shards.save_ms_shard(outs, path, fmt)))
        if fmt == "safetensors":
            shards.verify_written(path, [(o.name, o.tag, o.shape) for o in outs if o.data is not None])
        for it, g in zip(shard, groups):
            o, dg = g[0], next(digests)
            rec = {"source_key": it.key, "source_file": os.path.basename(it.source_file),
                   "source_dtype": it.tag, "shape": list(it.shape)}
            if it.target is None:
                rec.update(target="dropped", sha256=dg)
            else:
                weight_map[it.target] = fname
                rec.update(target=it.target, target_file=fname, dtype=it.out_tag,
                           target_shape=list(o.shape), sha256=dg)
            for extra in g[1:]:  # the scales of a quantised weight
                weight_map[extra.name] = fname
                rec.update(quantize=it.quantize, scale={"target": extra.name, "dtype": extra.tag,
                                                        "shape": list(extra.shape), "sha256": next(digests)})
            records.append(rec)

    shards.run_shards(plan, tmp, quiet, "convert", lambda si, n: f"ms_model-{si + 1:05d}-of-{n:05d}.{ext}",
                      write_shard)
    return weight_map, records


def _write_to_torch(plan: Plan, tmp: str, quiet: bool, warnings: List[str]) -> dict:
    weight_map = {}

    def write_shard(si, shard, fname, path, hasher, prog):
        outs = []
        for it in shard:  # the stored bytes are hashed (checked against conversion.json)
            span = it.source.span(it.key)
            if span is not None and it.out_tag == it.tag and not has_surgery(it.key):
                outs.append(Out(it.target, it.out_tag, it.shape, span, span))
                continue
            raw = it.source.read(it.key, None)
            arr = surgery_to_official(it.key, raw) if has_surgery(it.key) else raw
            arr = cast_raw(arr, it.tag, it.out_tag, warnings, it.key)
            outs.append(Out(it.target, it.out_tag, tuple(arr.shape), arr, span or raw))
        digests = shards.hash_and_write(hasher, prog, outs, [o for o in outs if o.hashed is not o.data],
                                        lambda: write_stream(path, outs, {"format": "pt"}))
        for it, dg in zip(shard, digests):
            if it.expect_sha is not None and dg != it.expect_sha:
                raise ConversionError(f"{it.source_file}: key '{it.key}' does not match the sha256 in "
                                      f"{CONVERSION_FILE} (file corrupted after conversion?)")
            weight_map[it.target] = fname

    shards.run_shards(plan, tmp, quiet, "to-torch", lambda si, n: f"model-{si + 1:05d}-of-{n:05d}.safetensors",
                      write_shard)
    return weight_map


def _mindspore_version() -> str:
    """Without importing MindSpore (~2.5 s) when its package metadata is there."""
    try:
        from importlib.metadata import version
        return version("mindspore")
    except Exception:  # metadata missing: ask the module itself
        import mindspore as ms
        return ms.__version__


def convert_to_ms(src: str, dst: str, dtype: Optional[str] = None, fmt: str = "safetensors",
                  shard_size: int = 2 * 10 ** 9, allow_pickle: bool = False, overwrite: bool = False,
                  quiet: bool = True, quantize: Optional[str] = None) -> dict:
    """Official checkpoint (file or dir) -> MindSpore shards + ms_model.index.json + conversion.json.
    quantize "int8": the LLM's base weights and the output head as int8 codes `<key>` + fp32 `<key>_scale`
    (one per output row; safetensors only), the other tensors as `dtype` says (default: as stored)."""
    if fmt not in ("safetensors", "ckpt"):
        raise ConversionError(f"unsupported --format {fmt!r} (safetensors or ckpt)")
    if quantize is not None and fmt != "safetensors":
        raise ConversionError(f"--quantize {quantize} writes safetensors shards only, not --format {fmt}")
    t0 = time.time()
    plan = plan_to_ms(src, dtype, shard_size, allow_pickle, quantize)
    t_plan = time.time() - t0

    def write(tmp: str, warnings: List[str]) -> dict:
        t1 = time.time()
        weight_map, records = _write_to_ms(plan, tmp, fmt, quiet, warnings)
        t_write = time.time() - t1
        copy_extra(plan, tmp)
        total = plan.total_bytes
        write_json(os.path.join(tmp, MS_INDEX), {
            "metadata": {"format": fmt, "total_size": total, "tool": f"{TOOL} {TOOL_VERSION}"},
            "weight_map": weight_map})
        out_dtypes = sorted({it.out_tag for it in plan.items if it.target is not None})
        summary = {
            "tool": TOOL, "tool_version": TOOL_VERSION, "mindspore_version": _mindspore_version(),
            "numpy_version": np.__version__, "direction": plan.direction, "source": plan.src,
            "source_files": plan.source_files, "config": os.path.basename(plan.cfg_path), "format": fmt,
            "dtype": dtype_tag(dtype) or "source", "output_dtypes": out_dtypes, "quantize": quantize,
            "shard_size": shard_size,
            "num_shards": len(plan.shards), "total_size": total,
            "num_converted": sum(1 for r in records if r["target"] != "dropped"),
            "num_dropped": sum(1 for r in records if r["target"] == "dropped"),
            "copied_files": plan.extra_files, "skipped": plan.skipped, "warnings": warnings,
            "seconds": {"plan": round(t_plan, 3), "write": round(t_write, 3)},
            "tensors": records,
        }
        write_json(os.path.join(tmp, CONVERSION_FILE), summary)
        return {k: v for k, v in summary.items() if k != "tensors"}

    return run_atomic(plan, dst, overwrite, quiet, write)


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
        copy_extra(plan, tmp)
        write_json(os.path.join(tmp, TORCH_INDEX), {"metadata": {"total_size": plan.total_bytes},
                                                    "weight_map": dict(sorted(weight_map.items()))})
        return {"tool": TOOL, "tool_version": TOOL_VERSION, "direction": plan.direction, "source": plan.src,
                "num_shards": len(plan.shards), "total_size": plan.total_bytes,
                "num_converted": len(weight_map), "num_dropped": 0, "copied_files": plan.extra_files,
                "skipped": plan.skipped, "seconds": {"plan": round(t_plan, 3), "write": round(t_write, 3)}}

    return run_atomic(plan, dst, overwrite, quiet, write)

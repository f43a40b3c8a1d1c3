"""Loading into quantised storage: quantised while streaming from a float checkpoint, or read pre-quantised."""
from __future__ import annotations

import time
from typing import Mapping, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..weights import CheckpointError
from ..weights.layout import open_weights
from ..dtypes import np_dtype
from ..weights.loader import check_keys, set_parameter, stream_into
from ..weights.sources import StateSource, WeightSource
from ..weights.tags import widen
from .int8 import pack_rows, quantize_int8, to_float16
from .lazy import LazyLoras
from .prepare import QUANT_MODES, SCALE_SUFFIX, prepare


def stored_quantization(src: WeightSource) -> Optional[str]:
    """'int8' when the checkpoint holds int8 weights with their `weight_scale` (written by ixc25-convert
    --quantize int8), else None."""
    keys = set(src.keys())
    for k in keys:
        if k.endswith(".weight") and src.dtype_tag(k) == "I8" and k + SCALE_SUFFIX in keys:
            return "int8"
    return None


def _assign(p, arr: np.ndarray) -> None:
    p.set_data(Tensor(np.ascontiguousarray(arr)))


def stream_prepared(model, src: WeightSource, path: str) -> dict:
    """Fill a `prepare`d model from `src` one tensor at a time: float weights for int8 Parameters are quantised
    here (and give their `weight_scale`), for fp16 ones narrowed, int8 ones (pre-quantised) taken as stored;
    write/web LoRA keys are left to `model.lazy_loras`. Keys and shapes are checked first."""
    params = dict(model.parameters_and_names())
    lazy = model.lazy_loras
    shapes, order = {}, []
    for k in src.keys():
        if lazy is not None and lazy.owns(k):
            continue
        shape, tag, p = src.shape(k), src.dtype_tag(k), params.get(k)
        shapes[k] = shape
        order.append(k)
        if tag == "I8" and (p is None or p.dtype != ms.int8):
            raise CheckpointError(f"{path}: key '{k}' is stored int8 (a pre-quantised checkpoint); load it with "
                                  f"quantize='int8'")
        if p is not None and p.dtype == ms.int8 and tag != "I8":
            shapes[k + SCALE_SUFFIX] = shape[:1]  # computed from the float weight
    check_keys(model, shapes, path)
    report = {"quantized": 0, "prequantized": 0, "fp16": 0, "fp16_inexact": 0, "fp16_values": 0}
    packed = getattr(model, "packed_int8", set())  # int8 weights held in the CPU mat-vec's layout
    for k in order:
        if k not in params:
            continue  # droppable buffer (check_keys allowed it)
        p, tag = params[k], src.dtype_tag(k)
        raw = src.read(k, None)
        if p.dtype == ms.int8 and tag != "I8":
            q, scale = quantize_int8(raw, tag)
            _assign(p, pack_rows(q) if k in packed else q)
            _assign(params[k + SCALE_SUFFIX], scale)
            report["quantized"] += 1
        elif p.dtype == ms.int8:
            _assign(p, pack_rows(raw) if k in packed else raw)
            report["prequantized"] += 1
        elif p.dtype == ms.float16:
            h, inexact = to_float16(raw, tag)
            _assign(p, h)
            report["fp16"] += 1
            report["fp16_inexact"] += inexact
            report["fp16_values"] += h.size
        else:
            set_parameter(p, widen(raw, tag, np_dtype(p.dtype)))  # fp32 as is; bf16 cast from fp32
        del raw
    return report


def load_weights(model, path, allow_pickle: bool = False, quantize: Optional[str] = None,
                 lazy_loras: bool = True) -> dict:
    """Fill `model` from the checkpoint at `path` (or an in-memory {key: array} state dict). quantize None: as
    stored (float, or int8 for a pre-quantised checkpoint); "int8"/"fp16": quantised storage (prepare).
    lazy_loras True: the write/web LoRAs stay on disk until an infer_mode asks for them (base mode never reads
    them: ~0.5 GB fp32 at the mid config, 2.4 B parameters at 7B); False: every tensor in memory (training, which
    saves them back). Float, non-lazy loads from a path take the plain streaming loader. Returns a small report
    (also `model.load_report`)."""
    t = time.perf_counter()
    if quantize not in (None,) + QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES} or None, got {quantize!r}")
    if isinstance(path, Mapping):
        state = path
        path = "state dict"
        def open_source():
            return StateSource(state, path)
    else:
        def open_source():
            return open_weights(path, allow_pickle)
    src = open_source()
    try:
        stored = stored_quantization(src)
        if stored is not None and quantize not in (None, stored):
            raise CheckpointError(f"{path}: the checkpoint is pre-quantised {stored}; it loads as {stored} only "
                                  f"(quantize={quantize!r} asked)")
        mode = quantize or stored
        lazy = bool(lazy_loras)
        if mode is None and not lazy and not isinstance(src, StateSource):
            src.close()
            stream_into(model, path, allow_pickle)
            report = {}
        else:
            prepare(model, mode, lazy)
            lazy_keys = [k for k in src.keys() if LazyLoras.owns(k)] if lazy else []
            model.lazy_loras = LazyLoras(path, lazy_keys, allow_pickle, open_source) if lazy else None
            report = stream_prepared(model, src, path)
    finally:
        src.close()
    report.update(mode=mode, stored=stored, lazy_loras=lazy, seconds=time.perf_counter() - t)
    model.load_report = report
    return report

"""The write/web LoRAs on demand: read from the checkpoint the first time an infer_mode needs them."""
from __future__ import annotations

import re
import time
from typing import Dict, List

import numpy as np
from mindspore import Tensor

from ..language.linear import Linear
from ..weights import CheckpointError
from ..weights.layout import open_weights
from ..weights.tags import widen
from .int8 import to_float16
from .prepare import LAZY_LORAS, name_parameters, plora_cells, to_fp16

_KEY = re.compile(r"model\.layers\.\d+\.[\w.]+\.(lora_sft|lora_dpo|lora_web)_[AB]\.weight")


class LazyLoras:
    """Which write/web LoRA keys a checkpoint holds, and loading them into a prepared model (prepare with
    lazy_loras) when `ensure(model, infer_mode)` is first asked for 'write' or 'web'. They are stored like the
    partial LoRA (fp16 under a quantised mode, else the compute dtype). `seconds[mode]` is what the first
    call of that mode paid for reading them (the new mode's graphs compile on top, under jit)."""

    def __init__(self, path: str, keys: List[str], allow_pickle: bool = False, open_source=None):
        self.path, self.allow_pickle = path, allow_pickle
        self.open_source = open_source or (lambda: open_weights(path, allow_pickle))  # -> a WeightSource
        self.keys = set(keys)
        self.loaded: Dict[str, bool] = {}
        self.seconds: Dict[str, float] = {}

    @staticmethod
    def owns(key: str) -> bool:
        """Whether `key` is a write/web LoRA weight (left out of the initial load)."""
        return _KEY.fullmatch(key) is not None

    def ensure(self, model, infer_mode: str) -> None:
        """Load `infer_mode`'s LoRA branches into every PLoRA of `model` unless already there."""
        if infer_mode not in LAZY_LORAS or self.loaded.get(infer_mode):
            return
        t = time.perf_counter()
        fp16 = model.quantization is not None
        cells = list(plora_cells(model))
        want = [f"{n}.{b}_{ab}.weight" for n, _ in cells for b in LAZY_LORAS[infer_mode] for ab in "AB"]
        missing = [k for k in want if k not in self.keys]
        if missing:
            raise CheckpointError(f"{self.path}: infer_mode '{infer_mode}' needs key '{missing[0]}', which the "
                                  f"checkpoint does not hold ({len(missing)} missing)")
        src = self.open_source()
        try:
            for name, cell in cells:
                for b in LAZY_LORAS[infer_mode]:
                    for ab in "AB":
                        key = f"{name}.{b}_{ab}.weight"
                        shape = src.shape(key)
                        lin = Linear(shape[1], shape[0], dtype=cell.compute_dtype)
                        if fp16:
                            to_fp16(lin)
                        raw = src.read(key, None)
                        if fp16:
                            arr = to_float16(raw, src.dtype_tag(key))[0]
                        else:
                            arr = widen(raw, src.dtype_tag(key), np.float32)
                        lin.weight.set_data(Tensor(arr))
                        setattr(cell, f"{b}_{ab}", lin)
        finally:
            src.close()
        name_parameters(model)
        self.loaded[infer_mode] = True
        self.seconds[infer_mode] = time.perf_counter() - t

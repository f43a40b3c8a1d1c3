"""Quantised storage of the LLM's weights: which Parameters change form, swapped in before any weight is loaded.

`prepare(model, mode)` runs on a freshly built model (its Parameters are still uninitialised, so nothing float
of the swapped weights is ever allocated):
- mode "int8": the base weight of every decoder linear (`wqkv`, `wo`, `w1`, `w2`, `w3`) and of the output head
  becomes int8 codes `weight` (out, in) plus `weight_scale` (out,) fp32 (one scale per output channel); with
  the CPU kernels the codes are held in the mat-vec's packed layout (`model.packed_int8` names them; the
  loader packs, `quantize.int8.unpack_rows` reads them back row-major);
- mode "fp16": those weights become fp16;
- both modes: the other large float weights of the LLM — the partial LoRA (`Plora_A`/`Plora_B`) and the token
  embeddings — are stored fp16 (exact for bf16 checkpoints within fp16's range), computed in fp32;
- lazy_loras: the write/web LoRAs (`lora_sft_*`, `lora_dpo_*`, `lora_web_*`) are removed; `LazyLoras` loads
  them from the checkpoint when an infer_mode first needs them (also possible without a quantised mode).
- a model big enough to run memory-lean (`memory_lean()`: the 7B) also stores the linears of its vision tower
  and projector fp16 (ViT-L: 0.6 GB less) and, under int8, its partial LoRA int8 (r 256: 0.6 GB less than
  fp16); smaller models keep the tower in the model's dtype and the partial LoRA fp16.
Norms, biases and tables keep the model's dtype. Activations stay in the compute dtype.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import mindspore as ms
from mindspore import Parameter
from mindspore.common.initializer import initializer

from ..language.linear import BaseLinear, PLoRA
from .int8 import SCALE_SUFFIX, packable
from .kernels import F16Matmul, Int8Matmul, ascend_weight_quant, cpu_quant_kernels

QUANT_MODES = ("int8", "fp16")
LAZY_LORAS = {"write": ("lora_sft", "lora_dpo"), "web": ("lora_web",)}  # infer_mode -> its LoRA branches


def base_linears(model) -> List[Tuple[str, BaseLinear]]:
    """(name, cell) of the LLM linears whose base weight a quantised mode stores quantised: every PLoRA of the
    decoder layers and the output head (names as in the checkpoint: `model.layers.N.attention.wqkv`, `output`)."""
    out = []
    for name, cell in model.cells_and_names():
        if (name.startswith("model.layers.") and isinstance(cell, PLoRA)) or name == "output":
            out.append((name, cell))
    return out


def plora_cells(model) -> Iterator[Tuple[str, PLoRA]]:
    for name, cell in model.cells_and_names():
        if name.startswith("model.layers.") and isinstance(cell, PLoRA):
            yield name, cell


def vision_linears(model) -> List[Tuple[str, BaseLinear]]:
    """(name, cell) of the linears of the vision tower and the projector (`vit.*`, `vision_proj.*`)."""
    return [(name, cell) for name, cell in model.cells_and_names()
            if name.startswith(("vit.", "vision_proj.")) and isinstance(cell, BaseLinear)]


def name_parameters(model) -> None:
    """Every Parameter named by its path in the model (swapped and added ones are named `weight` only)."""
    for n, p in model.parameters_and_names():
        if p.name != n:
            p.name = n


def to_int8(cell: BaseLinear, kernels=None, ascend: bool = False) -> bool:
    """int8 codes `weight` (out, in) + `weight_scale` (out,) fp32, uninitialised; base() goes through Int8Matmul.
    Returns whether the codes are to be stored in the CPU mat-vec's packed layout (CPU kernels, shape a
    multiple of 8 x 16): the loader then packs them (`packed_int8`)."""
    out, fin = cell.out_features, cell.in_features
    cell.weight = Parameter(initializer("zeros", (out, fin), ms.int8), name="weight", requires_grad=False)
    cell.weight_scale = Parameter(initializer("zeros", (out,), ms.float32), name="weight" + SCALE_SUFFIX,
                                  requires_grad=False)
    packed = kernels is not None and not ascend and packable(out, fin)
    cell.weight_matmul = Int8Matmul(kernels, ascend, packed)
    return packed


def to_fp16(cell: BaseLinear, kernels=None) -> None:
    """fp16 `weight` (out, in), uninitialised; base() goes through F16Matmul. No-op when the cell computes
    in fp16 (its weight is fp16 already)."""
    if cell.compute_dtype == ms.float16:
        return
    cell.weight = Parameter(initializer("zeros", (cell.out_features, cell.in_features), ms.float16),
                            name="weight", requires_grad=False)
    cell.weight_matmul = F16Matmul(kernels)


def drop_lazy_loras(model) -> None:
    """Remove the write/web LoRA branches of every PLoRA (their Parameters were never filled)."""
    for _, cell in plora_cells(model):
        for branches in LAZY_LORAS.values():
            for b in branches:
                setattr(cell, b + "_A", None)
                setattr(cell, b + "_B", None)


def prepare(model, mode=None, lazy_loras: bool = True) -> None:
    """Swap the storage of the LLM's weights for `mode` ("int8", "fp16" or None: float as built) and, with
    lazy_loras, remove the write/web LoRAs. Call before loading: the swapped Parameters are uninitialised."""
    if mode not in (None,) + QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES} or None, got {mode!r}")
    model.quantization = mode
    model.packed_int8 = set()  # names of the int8 weights the loader stores packed (Int8Matmul.packed)
    if mode is not None:
        dtype = model.compute_dtype
        kernels = cpu_quant_kernels(dtype, None if model.cpu_kernels else False)
        ascend = ascend_weight_quant(dtype)
        lean = model.memory_lean()
        for name, cell in base_linears(model):
            if mode == "int8":
                if to_int8(cell, kernels, ascend):
                    model.packed_int8.add(name + ".weight")
            else:
                to_fp16(cell, kernels)
        for name, cell in plora_cells(model):
            for bname, branch in (("Plora_A", cell.Plora_A), ("Plora_B", cell.Plora_B)):
                if lean and mode == "int8":
                    if to_int8(branch, kernels, ascend):
                        model.packed_int8.add(f"{name}.{bname}.weight")
                else:
                    to_fp16(branch, kernels)
        for layer in model.model.layers:  # the fused int8 decode blocks (DecoderLayer.decode_int8)
            cells = (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w3,
                     layer.feed_forward.w2)
            layer.int8_block = bool(mode == "int8" and model.cpu_kernels and all(
                c.weight_matmul is not None and getattr(c.weight_matmul, "packed", False) and c.bias is None
                and c.lora_A is None for c in cells))
        emb = model.model.tok_embeddings
        if emb.compute_dtype != ms.float16:
            emb.weight = Parameter(initializer("zeros", tuple(emb.weight.shape), ms.float16), name="weight",
                                   requires_grad=False)
        if lean:
            for _, cell in vision_linears(model):
                to_fp16(cell, kernels)
    if lazy_loras:
        drop_lazy_loras(model)
    name_parameters(model)

"""PEFT-format LoRA for IXC2.5: add branches to target modules, save/load adapters, merge B·A·alpha/r into weights."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from mindspore import Tensor

from ..language.linear import Linear, PLoRA

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA = "non_lora_trainables.safetensors"  # other tensors a LoRA run trained (LLaVA's convention)


class AdapterError(ValueError):
    """An adapter directory or a LoRA setting is unusable (the message names the file or flag)."""


def matches(name: str, target: str) -> bool:
    """PEFT's target_modules rule for a string: the module name equals it or ends with '.' + it."""
    return name == target or name.endswith("." + target)


def lora_cells(model, targets: Iterable[str], prefix: str = "") -> List[Tuple[str, object]]:
    """(name, cell) of every linear (PLoRA or Linear) under `prefix` whose name matches a target."""
    out = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, (PLoRA, Linear)) and name.startswith(prefix) and any(matches(name, t) for t in targets):
            out.append((name, cell))
    return out


def add_lora(model, targets: Iterable[str], r: int, alpha: float, dropout: float, prefix: str = "",
             seed: int = 0, flag: str = "--lora_target_modules") -> List[str]:
    """Adds PEFT LoRA branches (A random, B zero) to every matching linear; each target must match something."""
    targets = list(targets)
    found = lora_cells(model, targets, prefix)
    for t in targets:
        if not any(matches(n, t) for n, _ in found):
            raise AdapterError(f"{flag}: {t!r} matches no linear module of the model")
    for k, (name, cell) in enumerate(found):
        cell.add_lora(r, alpha, dropout, seed + k)
    name_parameters(model)
    return [n for n, _ in found]


def name_parameters(model) -> None:
    """Gives every Parameter its path in the model as its name (branches added after construction are named
    `weight` only; MindSpore's ParameterTuple and checkpoints need unique names)."""
    for n, p in model.parameters_and_names():
        if p.name != n:
            p.name = n


def adapter_state(model) -> Dict[str, np.ndarray]:
    """{PEFT key: array} of every LoRA branch: base_model.model.<module>.lora_A.weight / .lora_B.weight."""
    out = {}
    for name, cell in model.cells_and_names():
        if getattr(cell, "lora_A", None) is not None and isinstance(cell, (PLoRA, Linear)):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = cell.lora_A.weight.asnumpy().astype(np.float32)
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = cell.lora_B.weight.asnumpy().astype(np.float32)
    return out


def adapter_config(base_path: str, llm: Optional[dict], vit: Optional[dict]) -> dict:
    """PEFT LoraConfig JSON. llm/vit: {r, alpha, dropout, targets}; the ViT's rank and alpha go into PEFT's
    rank_pattern / alpha_pattern when they differ from the LLM's."""
    main = llm or vit
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": main["r"],
           "lora_alpha": main["alpha"], "lora_dropout": main["dropout"], "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "revision": None,
           "target_modules": list((llm or {}).get("targets", [])) + list((vit or {}).get("targets", [])),
           "rank_pattern": {}, "alpha_pattern": {}}
    if llm and vit:
        for t in vit["targets"]:
            cfg["rank_pattern"][t] = vit["r"]
            cfg["alpha_pattern"][t] = vit["alpha"]
    return cfg


def read_adapter(path: str, allow_pickle: bool = False) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(adapter_config, {PEFT key: float32 array}) of an adapter directory (ours, or one saved by PEFT:
    adapter_model.safetensors, or adapter_model.bin behind allow_pickle)."""
    from ..weights import CheckpointError
    from ..weights.layout import load_state_dict
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON: line {e.lineno} column {e.colno} ({e.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    st, binf = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        weights = load_state_dict(st)
    elif os.path.isfile(binf):
        if not allow_pickle:
            raise AdapterError(f"{binf}: pickle adapter; pass allow_pickle=True (--allow-pickle) to read it")
        try:
            weights = load_state_dict(binf, allow_pickle=True)
        except CheckpointError as e:
            raise AdapterError(str(e)) from None
    else:
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS} or adapter_model.bin")
    return cfg, {re.sub(r"\.default\.weight$", ".weight", k): v for k, v in weights.items()}


def _rank_alpha(cfg: dict, module: str) -> Tuple[int, float]:
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    for pat, v in (cfg.get("rank_pattern") or {}).items():
        if matches(module, pat) or re.fullmatch(pat, module):
            r = int(v)
    for pat, v in (cfg.get("alpha_pattern") or {}).items():
        if matches(module, pat) or re.fullmatch(pat, module):
            alpha = float(v)
    return r, alpha


def modules_of(weights: Dict[str, np.ndarray], where: str) -> List[str]:
    mods = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in weights if ".lora_" in k})
    bad = [k for k in weights if not k.startswith(PEFT_PREFIX) or not re.search(r"\.lora_[AB]\.weight$", k)]
    if bad:
        raise AdapterError(f"{where}: unexpected adapter key {bad[0]!r} (expected {PEFT_PREFIX}<module>.lora_A.weight)")
    return mods


def apply_adapter(model, path: str, allow_pickle: bool = False) -> List[str]:
    """Adds the adapter's LoRA branches to `model` (on all tokens, after the partial LoRA) and loads them; also
    loads `non_lora_trainables.safetensors` when present. Returns the adapted module names."""
    cfg, weights = read_adapter(path, allow_pickle)
    cells = dict(model.cells_and_names())
    mods = modules_of(weights, path)
    for mod in mods:
        cell = cells.get(mod)
        if not isinstance(cell, (PLoRA, Linear)):
            raise AdapterError(f"{path}: adapter module {mod!r} is not a linear of this model")
        a, b = weights.get(f"{PEFT_PREFIX}{mod}.lora_A.weight"), weights.get(f"{PEFT_PREFIX}{mod}.lora_B.weight")
        if a is None or b is None:
            raise AdapterError(f"{path}: module {mod!r} lacks lora_A or lora_B")
        r, alpha = _rank_alpha(cfg, mod)
        if a.shape != (r, cell.in_features) or b.shape != (cell.out_features, r):
            raise AdapterError(f"{path}: {mod}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit r={r} and "
                               f"the layer's {cell.in_features} -> {cell.out_features}")
        cell.add_lora(r, alpha, 0.0)
        cell.lora_A.weight.set_data(Tensor(a.astype(np.float32)).astype(cell.weight.dtype))
        cell.lora_B.weight.set_data(Tensor(b.astype(np.float32)).astype(cell.weight.dtype))
    name_parameters(model)
    extra = os.path.join(path, NON_LORA)
    if os.path.isfile(extra):
        from ..weights.layout import load_state_dict
        state = load_state_dict(extra)
        params = dict(model.parameters_and_names())
        unknown = [k for k in state if k not in params]
        if unknown:
            raise AdapterError(f"{extra}: key {unknown[0]!r} is not a parameter of the model")
        for k, v in state.items():
            params[k].set_data(Tensor(v.astype(np.float32)).astype(params[k].dtype))
    return mods


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """PEFT merge_and_unload: W + (B @ A) * alpha / r, in float32."""
    return (w.astype(np.float32) + (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(scaling)).astype(np.float32)


def merge_plan(cfg: dict, weights: Dict[str, np.ndarray], where: str) -> Dict[str, Tuple[np.ndarray, np.ndarray, float]]:
    """{official base-weight key: (A, B, alpha / r)} of an adapter."""
    out = {}
    for mod in modules_of(weights, where):
        r, alpha = _rank_alpha(cfg, mod)
        out[f"{mod}.weight"] = (weights[f"{PEFT_PREFIX}{mod}.lora_A.weight"],
                                weights[f"{PEFT_PREFIX}{mod}.lora_B.weight"], alpha / r)
    return out

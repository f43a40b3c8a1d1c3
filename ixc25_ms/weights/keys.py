"""The one key table official PyTorch checkpoint <-> MindSpore model (both directions), its surgery hook and drops."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Pattern, Tuple

import numpy as np

from ..vision.registry import key_rows as vision_key_rows, key_slots as vision_key_slots

Row = Tuple[str, Optional[str]]  # (official key pattern, MindSpore key pattern; None: drop, never converted)

# Placeholders usable in the rows; each becomes a named regex group.
LLM_SLOTS = {
    "n": r"\d+",                                                              # layer index
    "linear": r"attention\.wqkv|attention\.wo|feed_forward\.w[123]",          # PLoRA linears
    "lora": r"Plora_[AB]|lora_sft_[AB]|lora_dpo_[AB]|lora_web_[AB]",          # their LoRA branches
    "wb": r"weight|bias",
    "norm": r"attention_norm|ffn_norm",
    "vp": r"[02]",                                                            # vision_proj Linear indices
    "rope": r"inv_freq|cos_cached|sin_cached",                                # RoPE buffers
}

# ------------------------------------------------------------------------------------ the table
SLOTS = dict(LLM_SLOTS)
for _name, _rx in vision_key_slots().items():  # each vision tower's placeholders (ixc25_ms/vision/*_spec.py)
    if SLOTS.setdefault(_name, _rx) != _rx:
        raise ValueError(f"vision key slot {_name!r} clashes with the LLM's key slots")

# official key pattern                                          MindSpore key (None: drop, never converted)
KEY_TABLE: List[Row] = [
    ("model.tok_embeddings.weight",                              "model.tok_embeddings.weight"),
    ("model.layers.{n}.{linear}.{wb}",                           "model.layers.{n}.{linear}.{wb}"),
    ("model.layers.{n}.{linear}.{lora}.weight",                  "model.layers.{n}.{linear}.{lora}.weight"),
    ("model.layers.{n}.{norm}.weight",                           "model.layers.{n}.{norm}.weight"),
    ("model.norm.weight",                                        "model.norm.weight"),
    ("output.weight",                                            "output.weight"),
    *vision_key_rows(),  # every registered vision tower's rows (CLIP: vit.vision_tower.vision_model.*)
    ("vision_proj.{vp}.{wb}",                                    "vision_proj.{vp}.{wb}"),
    ("plora_glb_GN",                                             "plora_glb_GN"),
    ("plora_sub_GN",                                             "plora_sub_GN"),
    ("model.layers.{n}.attention.rotary_emb.{rope}",             None),  # recomputed
]

# Tensor surgery, keyed by MindSpore key regex: (to MindSpore, back to official), layout-only functions of the
# stored array (bf16 comes as uint16 bits). The MindSpore model keeps the official layouts (fused wqkv,
# [out, in] linears, [1,1,4C] GN tokens), so nothing is needed today.
SURGERY: Dict[str, Tuple] = {}


class UnknownKeyError(KeyError):
    """A key that no row of KEY_TABLE matches."""


def _compile(pattern: str) -> Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{SLOTS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


_FORWARD = [(_compile(src), dst) for src, dst in KEY_TABLE]
_BACKWARD = [(_compile(dst), src) for src, dst in KEY_TABLE if dst is not None]


def official_to_ms(key: str) -> Optional[str]:
    """MindSpore name for an official key; None if the key is a buffer to drop; UnknownKeyError otherwise."""
    for rx, dst in _FORWARD:
        m = rx.fullmatch(key)
        if m:
            return None if dst is None else dst.format(**m.groupdict())
    raise UnknownKeyError(key)


def ms_to_official(key: str) -> str:
    """Official key for a MindSpore parameter name; UnknownKeyError if no row maps to it."""
    for rx, src in _BACKWARD:
        m = rx.fullmatch(key)
        if m:
            return src.format(**m.groupdict())
    raise UnknownKeyError(key)


def is_droppable(key: str) -> bool:
    """True for a buffer some official checkpoints carry that the model recomputes (a None row of KEY_TABLE)."""
    try:
        return official_to_ms(key) is None
    except UnknownKeyError:
        return False


def surgery_to_ms(ms_key: str, arr: np.ndarray) -> np.ndarray:
    for pat, (fwd, _) in SURGERY.items():
        if re.fullmatch(pat, ms_key):
            return fwd(arr)
    return arr


def surgery_to_official(ms_key: str, arr: np.ndarray) -> np.ndarray:
    for pat, (_, back) in SURGERY.items():
        if re.fullmatch(pat, ms_key):
            return back(arr)
    return arr


def has_surgery(ms_key: str) -> bool:
    return any(re.fullmatch(p, ms_key) for p in SURGERY)

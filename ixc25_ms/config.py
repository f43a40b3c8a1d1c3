"""Dataclass configs for IXC2.5 built from the official config.json (unknown keys ignored)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config.json value is missing, of the wrong type or inconsistent."""


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in names and names[k].init:
            kwargs[k] = v
    return cls(**kwargs)


def _check_int(where: str, name: str, value: Any, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: '{name}' must be an integer >= {minimum}, got {value!r}")


def _check_float(where: str, name: str, value: Any, positive: bool = True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise ConfigError(f"{where}: '{name}' must be a positive number, got {value!r}")


@dataclass
class VisionConfig:
    """Vision tower config. `model_type` picks the tower in ixc25_ms.vision.registry, which validates the rest
    (patch grid, activations). Defaults: CLIP ViT-L/14 at 560 px (the real checkpoint ships no vision config)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 560
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    model_type: str = "clip_vision_model"  # ixc25_ms.vision.registry.DEFAULT_MODEL_TYPE
    where: str = field(default="vision_config", repr=False, compare=False)

    def __post_init__(self):
        from .vision.registry import spec_of
        w = self.where
        for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "image_size", "patch_size", "num_channels"):
            _check_int(w, n, getattr(self, n))
        _check_float(w, "layer_norm_eps", self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        spec_of(self).validate(self)  # unknown model_type, grid, activation: one-line ConfigError

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> "VisionConfig":
        """Keys the dict leaves out take the selected tower's defaults, then VisionConfig's."""
        from .vision.registry import DEFAULT_MODEL_TYPE, tower_spec
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        spec = tower_spec(d.get("model_type", DEFAULT_MODEL_TYPE), where)
        return _from_dict(cls, {**spec.defaults, **d, "where": where}, where)


REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class IXCConfig:
    """InternLM2 language model + IXC2.5 extras (PLoRA ranks, vision tower)."""

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    max_length: int = 16384
    lora_r: int = 256
    lora_alpha: int = 256
    web_lora_r: int = 512
    vision_config: Optional[dict] = field(default=None, compare=False)  # raw dict; `vision` is parsed
    where: str = field(default="config.json", repr=False, compare=False)
    vision: VisionConfig = field(init=False)

    def __post_init__(self):
        w = self.where
        for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "lora_r", "web_lora_r"):
            _check_int(w, n, getattr(self, n))
        _check_float(w, "rms_norm_eps", self.rms_norm_eps)
        _check_float(w, "rope_theta", self.rope_theta)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{w}: num_attention_heads {self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{w}: unsupported hidden_act {self.hidden_act!r} (InternLM2 uses silu)")
        if self.tie_word_embeddings:
            raise ConfigError(f"{w}: tie_word_embeddings=true is not an IXC2.5 layout")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict) or "type" not in rs or "factor" not in rs:
                raise ConfigError(f"{w}: 'rope_scaling' must be null or {{\"type\": ..., \"factor\": ...}}, "
                                  f"got {rs!r}")
            if rs["type"] not in ("linear", "dynamic"):
                raise ConfigError(f"{w}: unknown rope_scaling type {rs['type']!r} "
                                  f"(supported: 'linear', 'dynamic')")
            _check_float(w, "rope_scaling.factor", rs["factor"])
            if rs["factor"] < 1.0 and rs["type"] == "dynamic":
                raise ConfigError(f"{w}: rope_scaling.factor must be >= 1, got {rs['factor']}")
        if self.vision_config is None:
            self.vision = VisionConfig()
        else:
            self.vision = VisionConfig.from_dict(self.vision_config, where=f"{w}: vision_config")

    # derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_out(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    @property
    def vit_merged_dim(self) -> int:  # 2x2 token merge width, the projector's input
        return 4 * self.vision.hidden_size

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "IXCConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}")
        d = dict(d)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        return _from_dict(cls, dict(d, where=where), where)

    @classmethod
    def from_file(cls, path: str) -> "IXCConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=path)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.init and f.name not in ("where",)}
        d["vision_config"] = {f.name: getattr(self.vision, f.name) for f in dataclasses.fields(self.vision)
                              if f.name != "where"}
        d["model_type"] = "internlm2"
        d["architectures"] = ["InternLMXComposer2ForCausalLM"]
        return d

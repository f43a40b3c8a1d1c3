"""What a vision tower declares: view geometry, config checks, parameter spec and converter key rows (no MindSpore)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

Shape = Tuple[int, ...]
KeyRow = Tuple[str, Optional[str]]  # (official key pattern, MindSpore key pattern or None = drop)


@dataclass(frozen=True)
class ViewGeometry:
    """One ViT view: a `resolution` x `resolution` crop cut into `patch`-px patches (a grid x grid patch grid).

    The IXC HD layout needs an even grid (2x2 token merge): each view gives half x half merged tokens."""

    resolution: int
    patch: int

    @property
    def grid(self) -> int:  # patches per side
        return self.resolution // self.patch

    @property
    def half(self) -> int:  # merged tokens per side after the 2x2 merge
        return self.grid // 2

    @property
    def tokens_per_view(self) -> int:  # merged tokens of one view
        return self.half * self.half


IXC_GEOMETRY = ViewGeometry(resolution=560, patch=14)  # the official IXC2.5 view: CLIP ViT-L/14 at 560 px


class TowerSpec:
    """Base of a registered vision tower. Subclasses set the class attributes and override `parameters` and
    `key_rows`; everything here is plain Python so config parsing and the converter never import MindSpore.

    model_type  -- the `vision_config.model_type` that selects the tower
    defaults    -- vision_config values used for keys the config.json leaves out (on top of VisionConfig's)
    activations -- accepted `hidden_act` values
    key_slots   -- extra {placeholder: regex} used by `key_rows` (the converter merges them with its own)
    cells       -- 'module:Class' of the MindSpore tower cell, imported only by `build`
    lora_targets -- module-name suffixes of its attention/MLP linears (the backbone LoRA's PEFT targets)
    """

    model_type: str = ""
    defaults: Dict[str, object] = {}
    activations: Tuple[str, ...] = ("gelu",)
    lora_targets: Tuple[str, ...] = ()
    key_slots: Dict[str, str] = {}
    cells: str = ""

    # -------------------------------------------------------------------------------------- geometry
    @classmethod
    def geometry(cls, v) -> ViewGeometry:
        """The view geometry of vision config `v` (crop side = image_size)."""
        return ViewGeometry(resolution=v.image_size, patch=v.patch_size)

    # -------------------------------------------------------------------------------------- config checks
    @classmethod
    def validate(cls, v) -> None:
        """Raise ConfigError (one line, naming `v.where` and the field) if `v` cannot drive this tower."""
        from ..config import ConfigError
        w = v.where
        if v.image_size % v.patch_size:
            raise ConfigError(f"{w}: 'image_size' {v.image_size} is not divisible by 'patch_size' {v.patch_size}")
        grid = v.image_size // v.patch_size
        if grid % 2:
            raise ConfigError(f"{w}: 'image_size' {v.image_size} / 'patch_size' {v.patch_size} gives an odd "
                              f"patch grid ({grid}x{grid}); the IXC 2x2 token merge needs an even grid")
        if v.hidden_act not in cls.activations:
            raise ConfigError(f"{w}: 'hidden_act' {v.hidden_act!r} is not supported by the {cls.model_type} "
                              f"tower (supported: {', '.join(cls.activations)})")

    # -------------------------------------------------------------------------------------- weights
    @classmethod
    def parameters(cls, v) -> Dict[str, Shape]:
        """{official key (under the model's `vit.` prefix): shape} for vision config `v`."""
        raise NotImplementedError

    @classmethod
    def key_rows(cls) -> List[KeyRow]:
        """Converter key-table rows for this tower's keys (placeholders from the converter's SLOTS + key_slots)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- model
    @classmethod
    def build(cls, v, dtype="float32"):
        """The MindSpore tower cell for vision config `v` (imports MindSpore)."""
        module, name = cls.cells.split(":")
        return getattr(importlib.import_module(module), name)(v, dtype)

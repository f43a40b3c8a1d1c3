"""The registry of vision towers, keyed by `vision_config.model_type` (CLIP is the default; no MindSpore here)."""
from __future__ import annotations

from typing import Dict, List, Type

from .clip_spec import CLIPSpec
from .tower import KeyRow, Shape, TowerSpec
from .vit_spec import TimmViTSpec

DEFAULT_MODEL_TYPE = CLIPSpec.model_type  # a config.json without vision_config (or without model_type) gets CLIP
TOWERS: Dict[str, Type[TowerSpec]] = {
    CLIPSpec.model_type: CLIPSpec,
    TimmViTSpec.model_type: TimmViTSpec,
}


def tower_spec(model_type: str = DEFAULT_MODEL_TYPE, where: str = "vision_config") -> Type[TowerSpec]:
    """The tower class registered for `model_type`; ConfigError naming `where` and 'model_type' otherwise."""
    if isinstance(model_type, str) and model_type in TOWERS:
        return TOWERS[model_type]
    from ..config import ConfigError
    raise ConfigError(f"{where}: unknown 'model_type' {model_type!r} (registered vision towers: "
                      f"{', '.join(sorted(TOWERS))})")


def spec_of(v) -> Type[TowerSpec]:
    """The tower class of a parsed VisionConfig."""
    return tower_spec(v.model_type, v.where)


def vision_parameters(v) -> Dict[str, Shape]:
    """{official key: shape} of the tower vision config `v` selects (under the model's `vit.` prefix)."""
    return spec_of(v).parameters(v)


def build_tower(v, dtype="float32"):
    """The MindSpore tower cell vision config `v` selects, in compute dtype `dtype`."""
    return spec_of(v).build(v, dtype)


def key_rows() -> List[KeyRow]:
    """The converter rows of every registered tower (a checkpoint may hold any registered tower)."""
    return [row for spec in TOWERS.values() for row in spec.key_rows()]


def key_slots() -> Dict[str, str]:
    """The placeholders every tower's rows use; a name two towers define differently is an error."""
    out: Dict[str, str] = {}
    for spec in TOWERS.values():
        for name, rx in spec.key_slots.items():
            if out.setdefault(name, rx) != rx:
                raise ValueError(f"vision tower {spec.model_type}: key slot {name!r} = {rx!r} clashes with "
                                 f"{out[name]!r} of another tower")
    return out

"""Vision side of IXC2.5: towers registered by vision_config.model_type, the HD layout, projector, encode_pixels."""
# Importing the package (or .tower / .registry / the *_spec modules) does not import MindSpore; the names in
# _LAZY that need it (tower cells, layout, projector, encode_pixels) are imported on first access.
from .registry import DEFAULT_MODEL_TYPE, TOWERS, build_tower, spec_of, tower_spec, vision_parameters  # noqa: F401
from .tower import IXC_GEOMETRY, TowerSpec, ViewGeometry  # noqa: F401

_LAZY = {
    "CLIPVisionTower": "clip", "TimmViTTower": "vit", "TowerCell": "cells",
    "merge_2x2": "layout", "global_local_layout": "layout", "expected_tokens": "layout", "split_views": "layout",
    "unique_views": "layout",
    "crop_grid": "layout", "build_vision_proj": "projector", "encode_pixels": "encode",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(["DEFAULT_MODEL_TYPE", "TOWERS", "build_tower", "spec_of", "tower_spec", "vision_parameters",
                  "IXC_GEOMETRY", "TowerSpec", "ViewGeometry", *_LAZY])

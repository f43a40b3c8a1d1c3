"""The PyTorch reference of each registered vision tower, keyed by vision_config.model_type."""
from __future__ import annotations

import torch

from parity_tests.reference.vision import VisionReference
from parity_tests.reference.vit import TimmViTReference

REFERENCE_TOWERS = {"clip_vision_model": VisionReference, "timm_vit": TimmViTReference}


def vision_reference(state, vision_cfg, dtype=torch.float32) -> VisionReference:
    """The reference vision path (tower, GN layout, projector) for `vision_cfg`'s tower over `state`."""
    cls = REFERENCE_TOWERS.get(vision_cfg.model_type)
    if cls is None:
        raise ValueError(f"no PyTorch reference for vision tower {vision_cfg.model_type!r} "
                         f"(references: {', '.join(sorted(REFERENCE_TOWERS))})")
    return cls(state, vision_cfg, dtype)

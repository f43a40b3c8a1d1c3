"""encode_pixels: normalised pixels -> [global, crops] -> any registered tower -> GN layout -> projector."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from ..dtypes import np_dtype
from .cells import TowerCell
from .layout import crop_grid, expected_tokens, global_local_layout, split_views, unique_views


def tower_features(vit: TowerCell, views, use_jit: bool = False, views_per_call: int = 0,
                   dedupe: bool = False) -> Tensor:
    """(V,3,R,R) -> (V, grid*grid, C) tower features, `views_per_call` views per call (0: all at once), through
    `forward_jit` under jit (one graph per batch size). views: a Tensor, or a numpy array (in the dtype the
    tower is to get). dedupe (numpy views only): a view equal to an earlier one (a 1x1 crop grid's global view and
    its crop) is not run again, its features are the earlier one's; with one view a call the result is the same
    bit for bit. Not for a tower in training with dropout, where two equal views draw two masks."""
    index = None
    if isinstance(views, np.ndarray):
        if dedupe:
            views, index = unique_views(views)
        views = Tensor(views)
    feats = _run_tower(vit, views, use_jit, views_per_call)
    return feats if index is None else ops.gather(feats, Tensor(index.astype(np.int32)), 0)


def _run_tower(vit: TowerCell, views: Tensor, use_jit: bool, views_per_call: int) -> Tensor:
    tower = vit.forward_jit if use_jit else vit
    step = views_per_call if views_per_call > 0 else views.shape[0]
    parts = [tower(views[i:i + step]) for i in range(0, views.shape[0], step)]
    return parts[0] if len(parts) == 1 else ops.concat(parts, axis=0)


def encode_pixels(vit: TowerCell, vision_proj: nn.Cell, glb_GN, sub_GN, pixel_values: np.ndarray,
                  use_jit: bool = False, return_layout: bool = False, views_per_call: int = 0,
                  dedupe: bool = True):
    """(1,3,H,W) normalised pixels (H, W multiples of the tower's resolution) -> image embeddings
    (1, N, llm_hidden) in the projector's dtype.

    Global view = torch-exact bicubic to the tower's resolution (numpy matrices); the tower sees
    [global, crops] in one batch; then the GN layout and vision_proj. With return_layout=True also returns the
    pre-projector layout (1, N, 4C). views_per_call > 0: the tower runs on that many views at a time (the
    attention scores of ViT-L are 0.16 GB per view in fp32; the memory-lean path of quantised models uses 1).
    dedupe: a view equal to an earlier one (a 1x1 crop grid's global view is its crop) runs once (tower_features);
    the parity tool turns it off, to hook the tower on every view as the official code runs it."""
    if not isinstance(vit, TowerCell):
        raise TypeError(f"encode_pixels: vit must be a vision tower cell (ixc25_ms.vision), got {type(vit).__name__}")
    geom = vit.geometry
    views = split_views(pixel_values, geom)
    h, w = crop_grid(pixel_values, geom)
    views = views.astype(np_dtype(vit.compute_dtype))
    feats = tower_features(vit, views, use_jit, views_per_call, dedupe=dedupe)
    layout = global_local_layout(feats, h, w, glb_GN, sub_GN, geom)
    n = expected_tokens(h, w, geom)
    if layout.shape[1] != n:
        raise RuntimeError(f"encode_pixels: {layout.shape[1]} image tokens for a {h}x{w} grid, expected {n}")
    proj_dtype = vision_proj[0].compute_dtype  # not the weight's: a memory-lean model stores it fp16
    emb = vision_proj(ops.cast(layout, proj_dtype))
    return (emb, layout) if return_layout else emb

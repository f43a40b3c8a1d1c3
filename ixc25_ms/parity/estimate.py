"""Input geometry and host memory / disk estimate of a parity run, for any registered vision tower."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def tower_geometry(cfg):
    """The ViewGeometry (resolution, patch, grid, half) of the tower cfg.vision selects (no MindSpore)."""
    from ..vision import spec_of
    return spec_of(cfg.vision).geometry(cfg.vision)


def input_geometry(images: Sequence, hd_num: int = 24, text_tokens: int = 30, geometry=None):
    """(ViT views, prompt length) the given images would give with the tower's `geometry` (a ViewGeometry;
    default the official 560/14). Images only; videos are not planned."""
    from PIL import Image

    from ..processing import hd_plan
    from ..vision import IXC_GEOMETRY, expected_tokens
    geom = IXC_GEOMETRY if geometry is None else geometry
    crop = geom.resolution
    if len(images) > 1:
        hd_num = 6
    views, seq = 0, text_tokens
    for img in images:
        with Image.open(img) as im:
            width, height = im.size
        new_w, new_h = hd_plan(width, height, hd_num, crop)
        a, b = new_w // crop, -(-new_h // crop)  # crops along the long / short side
        rows, cols = (a, b) if width < height else (b, a)
        views += 1 + rows * cols
        seq += expected_tokens(rows, cols, geom)
    return views, seq


def estimate_memory(cfg, dtype: str = "fp32", seq_len: int = 1267, n_views: int = 3, steps: int = 4,
                    ref_dtype: str = "fp32", geometry: Optional[object] = None) -> dict:
    """Rough host memory (GiB) of each side and disk for the saved activations, from the parameter count
    and the shapes of the largest activations (eager attention materialises heads x L x L scores).
    geometry: the tower's ViewGeometry (default: the one cfg.vision selects)."""
    from ..weights.spec import expected_parameters, num_parameters
    geom = tower_geometry(cfg) if geometry is None else geometry
    n = num_parameters(cfg)
    nb = {"fp32": 4, "fp16": 2}[dtype]
    rb = {"fp32": 4, "fp16": 2}[ref_dtype]
    v, L, H, V = cfg.vision, seq_len, cfg.hidden_size, cfg.vocab_size
    gib = float(1024 ** 3)
    vit_attn = 3 * n_views * v.num_attention_heads * v.num_positions ** 2 * 4 if n_views else 0
    llm_attn = 3 * cfg.num_attention_heads * L * L * 4 + L * L * 4  # scores, probs, cast + the mask
    mlp = 3 * L * cfg.intermediate_size * max(nb, rb)
    logits = 2 * L * V * 4
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (L + steps + 64) * cfg.head_dim * max(nb, 4)
    act = max(vit_attn, llm_attn + mlp) + logits + kv
    r = geom.resolution
    vis_rows = n_views * (3 * r * r * 4 + (2 + v.num_hidden_layers) * v.num_positions * v.hidden_size * nb)
    img_tok = max(L - 30, 0)
    vis_rows += img_tok * (cfg.vit_merged_dim + H) * nb
    llm_rows = (3 * cfg.num_hidden_layers + 2) * L * H * nb + L * V * 4 + steps * V * 4
    # imported libraries (~0.7 GiB measured) + loading one checkpoint tensor (fp32 read + a copy)
    largest = max(int(np.prod(shape)) for shape in expected_parameters(cfg).values())
    overhead = 0.7 * gib + 2 * largest * 4
    ms_side = n * nb + act + overhead
    ref_side = n * rb + act + overhead
    return {"parameters": n, "seq_len": L, "vit_views": n_views,
            "ms_weights_gib": round(n * nb / gib, 2), "ref_weights_gib": round(n * rb / gib, 2),
            "activations_gib": round(act / gib, 2), "overhead_gib": round(overhead / gib, 2),
            "ms_side_gib": round(ms_side / gib, 2), "ref_side_gib": round(ref_side / gib, 2),
            # MindSpore's host memory pool keeps its activation peak after the model is freed
            "peak_gib": round(max(ms_side, ref_side + act) / gib, 2),
            "disk_gib": round((vis_rows + llm_rows) / gib, 2)}

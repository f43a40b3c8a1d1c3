"""The IXC HD layout for any tower geometry: [global view, crops] split, 2x2 merge, global-local GN layout, counts."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from mindspore import Tensor, ops

from ..processing import global_view
from .tower import IXC_GEOMETRY, ViewGeometry


def _as_tensor(x, dtype):
    if isinstance(x, np.ndarray):
        x = Tensor(x)
    return ops.cast(x, dtype)


def merge_2x2(feats, geom: ViewGeometry = IXC_GEOMETRY):
    """(B,grid²,C) -> (B,half,half,4C); channels ordered (dy0,dx0),(dy0,dx1),(dy1,dx0),(dy1,dx1), each a C block.
    At 560/14: (B,1600,C) -> (B,20,20,4C)."""
    b, n, c = feats.shape
    g, half = geom.grid, geom.half
    if n != g * g:
        raise ValueError(f"merge_2x2: expected {g * g} patch tokens per view ({g}x{g} grid), got {n}")
    x = ops.reshape(feats, (b, half, 2, half, 2, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, half, half, 4 * c))


def global_local_layout(feats, h: int, w: int, glb_GN, sub_GN, geom: ViewGeometry = IXC_GEOMETRY):
    """Tower features of [global, crop_0..crop_{hw-1}] (1+hw,grid²,C) -> (1, N, 4C) with the official GN layout
    (half = grid/2, 20 at 560/14): global half x half + sub_GN per row, one glb_GN, local (half*h)x(half*w) +
    sub_GN per row. N = expected_tokens(h, w, geom)."""
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"global_local_layout: {name} must be a positive integer, got {v!r}")
    h, w = int(h), int(w)
    if feats.shape[0] != 1 + h * w:
        raise ValueError(f"global_local_layout: {feats.shape[0]} views for a {h}x{w} grid (expected {1 + h * w})")
    dt = feats.dtype
    half = geom.half
    merged = merge_2x2(feats, geom)  # (1+hw, half, half, 4C)
    c4 = merged.shape[-1]
    glb = ops.reshape(_as_tensor(glb_GN, dt), (1, c4))
    sub = ops.reshape(_as_tensor(sub_GN, dt), (1, 1, c4))
    g = merged[0]
    g = ops.concat((g, ops.broadcast_to(sub, (half, 1, c4))), axis=1)
    g = ops.reshape(g, (half * (half + 1), c4))
    loc = ops.reshape(merged[1:], (h, w, half, half, c4))
    loc = ops.reshape(ops.transpose(loc, (0, 2, 1, 3, 4)), (h * half, w * half, c4))
    loc = ops.concat((loc, ops.broadcast_to(sub, (h * half, 1, c4))), axis=1)
    loc = ops.reshape(loc, (h * half * (w * half + 1), c4))
    return ops.expand_dims(ops.concat((g, glb, loc), axis=0), 0)


def expected_tokens(h: int, w: int, geom: ViewGeometry = IXC_GEOMETRY) -> int:
    """Image tokens for an h x w crop grid: (hw+1)*half² + 1 + (h+1)*half; (hw+1)*400 + 1 + (h+1)*20 at 560/14."""
    half = geom.half
    return (h * w + 1) * half * half + 1 + (h + 1) * half


def crop_grid(pixel_values, geom: ViewGeometry = IXC_GEOMETRY):
    """(h, w): crop rows and columns of (1,3,H,W) pixel values cut into resolution-px crops."""
    return pixel_values.shape[2] // geom.resolution, pixel_values.shape[3] // geom.resolution


def split_views(pixel_values: np.ndarray, geom: ViewGeometry = IXC_GEOMETRY) -> np.ndarray:
    """(1,3,H,W) normalised pixels -> float32 (1+hw,3,R,R), R = geom.resolution: [bicubic global view,
    row-major crops]."""
    pv = np.asarray(pixel_values)
    if pv.ndim != 4 or pv.shape[0] != 1 or pv.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape (1,3,H,W) (batch 1 only), got {pv.shape}")
    H, W = pv.shape[2], pv.shape[3]
    r = geom.resolution
    if H < r or W < r or H % r or W % r:
        raise ValueError(f"pixel_values height/width must be positive multiples of {r}, got {H}x{W}")
    if not np.issubdtype(pv.dtype, np.floating):
        raise ValueError(f"pixel_values must be a float array (normalised), got dtype {pv.dtype}")
    pv = pv.astype(np.float32, copy=False)
    if not np.isfinite(pv).all():
        raise ValueError("pixel_values contains NaN or Inf")
    h, w = H // r, W // r
    crops = pv.reshape(1, 3, h, r, w, r).transpose(0, 2, 4, 1, 3, 5).reshape(h * w, 3, r, r)
    return np.ascontiguousarray(np.concatenate([global_view(pv, r), crops], axis=0))


def unique_views(views: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(V,3,R,R) views -> (the distinct ones in first-seen order, index (V,) of each view among them), or (views,
    None) when no two are equal. A picture whose crop grid is 1x1 has a global view equal to its crop bit for bit
    (the bicubic resize of an R x R picture to R x R is the identity), so the tower need not see it twice: its
    features for a view do not depend on the others in the call. Equal means every element equal (array_equal);
    a sample of each view's pixels only picks the candidates."""
    n = len(views)
    if n < 2:
        return views, None
    buckets, keep = {}, []
    index = np.empty(n, np.int64)
    for i in range(n):
        key = views[i, :, ::37, ::37].tobytes()  # ~700 values a view at 560 px: a cheap key, confirmed in full
        for j in buckets.setdefault(key, []):
            if np.array_equal(views[keep[j]], views[i]):
                index[i] = j
                break
        else:
            buckets[key].append(len(keep))
            index[i] = len(keep)
            keep.append(i)
    if len(keep) == n:
        return views, None
    return views[keep], index

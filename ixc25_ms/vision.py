"""CLIP vision tower, 2x2 merge + GN layout and projector of IXC2.5 on MindSpore (checkpoint parameter names)."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .config import VisionConfig
from .dtypes import ms_dtype, np_dtype
from .processing import PATCH, global_view

GRID = 40  # patches per side at 560/14
HALF = GRID // 2  # 20: tokens per side after the 2x2 merge

def _param(shape, dtype, init="zeros"):
    return Parameter(initializer(init, shape, dtype))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with torch names `weight`/`bias`; computed in fp32, returned in x's dtype."""

    def __init__(self, n: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.weight = _param((n,), dtype, "ones")
        self.bias = _param((n,), dtype, "zeros")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32),
                            ops.cast(self.bias, ms.float32))
        return ops.cast(y, x.dtype)


class _PatchConv(nn.Cell):
    """Conv2d(3, C, k=s=patch, no bias) via ops.conv2d (mint Conv2d has no CPU kernel)."""

    def __init__(self, channels: int, hidden: int, patch: int, dtype):
        super().__init__()
        self.patch = patch
        self.weight = _param((hidden, channels, patch, patch), dtype)

    def construct(self, x):
        return ops.conv2d(x, self.weight, stride=self.patch)


class _Table(nn.Cell):
    """A learned table held as `weight` (position embeddings)."""

    def __init__(self, rows: int, dim: int, dtype):
        super().__init__()
        self.weight = _param((rows, dim), dtype)

    def construct(self):
        return self.weight


def _dense(n_in: int, n_out: int, dtype) -> nn.Dense:
    return nn.Dense(n_in, n_out, weight_init="zeros", bias_init="zeros", has_bias=True, dtype=dtype)


class CLIPEmbeddings(nn.Cell):
    """Patch conv + class token + all 1601 learned positions (no interpolation)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = _param((c,), dtype)
        self.patch_embedding = _PatchConv(cfg.num_channels, c, cfg.patch_size, dtype)
        self.position_embedding = _Table(cfg.num_positions, c, dtype)

    def construct(self, pixel_values):
        x = self.patch_embedding(pixel_values)  # (B, C, 40, 40)
        b, c = x.shape[0], x.shape[1]
        x = ops.transpose(ops.reshape(x, (b, c, -1)), (0, 2, 1))
        cls = ops.broadcast_to(ops.reshape(self.class_embedding, (1, 1, c)), (b, 1, c))
        x = ops.concat((ops.cast(cls, x.dtype), x), axis=1)
        return x + ops.expand_dims(ops.cast(self.position_embedding(), x.dtype), 0)


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with q/k/v/out projections (scores and softmax in fp32)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = c // self.heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = _dense(c, c, dtype)
        self.k_proj = _dense(c, c, dtype)
        self.v_proj = _dense(c, c, dtype)
        self.out_proj = _dense(c, c, dtype)

    def _split(self, x, b, n):
        return ops.transpose(ops.reshape(x, (b, n, self.heads, self.head_dim)), (0, 2, 1, 3))

    def construct(self, x):
        b, n, c = x.shape
        q = self._split(self.q_proj(x) * self.scale, b, n)
        k = self._split(self.k_proj(x), b, n)
        v = self._split(self.v_proj(x), b, n)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        probs = ops.cast(ops.softmax(ops.cast(scores, ms.float32), -1), v.dtype)
        out = ops.matmul(probs, v)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, n, c))
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    """fc1 -> quick_gelu (or exact gelu) -> fc2."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = _dense(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.fc2 = _dense(cfg.intermediate_size, cfg.hidden_size, dtype)

    def construct(self, x):
        h = self.fc1(x)
        if self.quick:
            h = h * ops.sigmoid(h * 1.702)
        else:
            h = ops.gelu(h, approximate="none")
        return self.fc2(h)


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.self_attn = CLIPAttention(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(cfg, dtype)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    """The stack of encoder layers (`layers.N`)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Cell):
    """HF CLIPVisionTransformer layout; post_layernorm is held for checkpoint round-trips but not used."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg, dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.encoder = CLIPEncoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def construct(self, pixel_values):
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))


class _VisionModel(nn.Cell):
    """Holds `vision_model` (the HF CLIPVisionModel wrapper level)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, dtype)

    def construct(self, pixel_values):
        return self.vision_model(pixel_values)


class CLIPVisionTower(nn.Cell):
    """IXC2.5 vision tower: (B,3,560,560) -> last-layer patch features (B,1600,C), CLS dropped, no post-LN.

    Parameters are named `vision_tower.vision_model.…` as in the checkpoint under `vit.`. Compute runs in
    `dtype` (float32 or float16); LayerNorm and softmax run in fp32. `forward_jit` is the graph-compiled
    twin of `construct` (one compile per batch size)."""

    def __init__(self, vision_cfg: VisionConfig, dtype=ms.float32):
        super().__init__()
        if not isinstance(vision_cfg, VisionConfig):
            raise TypeError(f"CLIPVisionTower needs a VisionConfig, got {type(vision_cfg).__name__}")
        self.cfg = vision_cfg
        self.compute_dtype = ms_dtype(dtype)
        self.hidden_size = vision_cfg.hidden_size
        self.vision_tower = _VisionModel(vision_cfg, self.compute_dtype)

    def construct(self, pixel_values):
        x = ops.cast(pixel_values, self.compute_dtype)
        h = self.vision_tower(x)
        return h[:, 1:, :]

    @ms.jit
    def forward_jit(self, pixel_values):
        """Graph-mode forward, same result as construct."""
        x = ops.cast(pixel_values, self.compute_dtype)
        h = self.vision_tower(x)
        return h[:, 1:, :]


def build_vision_proj(in_dim: int, out_dim: int, dtype=ms.float32) -> nn.SequentialCell:
    """The 'mlp2x_gelu' projector: Dense(in,out) -> exact GELU -> Dense(out,out); params 0.* and 2.*."""
    dtype = ms_dtype(dtype)
    return nn.SequentialCell([_dense(in_dim, out_dim, dtype), nn.GELU(approximate=False),
                              _dense(out_dim, out_dim, dtype)])


def merge_2x2(feats):
    """(B,1600,C) -> (B,20,20,4C); channels ordered (dy0,dx0),(dy0,dx1),(dy1,dx0),(dy1,dx1), each a C block."""
    b, n, c = feats.shape
    if n != GRID * GRID:
        raise ValueError(f"merge_2x2: expected {GRID * GRID} patch tokens per view, got {n}")
    x = ops.reshape(feats, (b, HALF, 2, HALF, 2, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, HALF, HALF, 4 * c))


def _as_tensor(x, dtype):
    if isinstance(x, np.ndarray):
        x = Tensor(x)
    return ops.cast(x, dtype)


def global_local_layout(feats, h: int, w: int, glb_GN, sub_GN):
    """ViT features of [global, crop_0..crop_{hw-1}] (1+hw,1600,C) -> (1, N, 4C) with the official GN layout:
    global 20x20 + sub_GN per row (420), one glb_GN, local (20h)x(20w) + sub_GN per row.
    N = (hw+1)*400 + 1 + (h+1)*20."""
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"global_local_layout: {name} must be a positive integer, got {v!r}")
    h, w = int(h), int(w)
    if feats.shape[0] != 1 + h * w:
        raise ValueError(f"global_local_layout: {feats.shape[0]} views for a {h}x{w} grid (expected {1 + h * w})")
    dt = feats.dtype
    merged = merge_2x2(feats)  # (1+hw, 20, 20, 4C)
    c4 = merged.shape[-1]
    glb = ops.reshape(_as_tensor(glb_GN, dt), (1, c4))
    sub = ops.reshape(_as_tensor(sub_GN, dt), (1, 1, c4))
    g = merged[0]
    g = ops.concat((g, ops.broadcast_to(sub, (HALF, 1, c4))), axis=1)
    g = ops.reshape(g, (HALF * (HALF + 1), c4))
    loc = ops.reshape(merged[1:], (h, w, HALF, HALF, c4))
    loc = ops.reshape(ops.transpose(loc, (0, 2, 1, 3, 4)), (h * HALF, w * HALF, c4))
    loc = ops.concat((loc, ops.broadcast_to(sub, (h * HALF, 1, c4))), axis=1)
    loc = ops.reshape(loc, (h * HALF * (w * HALF + 1), c4))
    return ops.expand_dims(ops.concat((g, glb, loc), axis=0), 0)


def expected_tokens(h: int, w: int) -> int:
    """Image tokens for an h x w crop grid: (hw+1)*400 + 1 + (h+1)*20."""
    return (h * w + 1) * HALF * HALF + 1 + (h + 1) * HALF


def split_views(pixel_values: np.ndarray) -> np.ndarray:
    """(1,3,H,W) normalised pixels -> float32 (1+hw,3,560,560): [bicubic global view, row-major crops]."""
    pv = np.asarray(pixel_values)
    if pv.ndim != 4 or pv.shape[0] != 1 or pv.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape (1,3,H,W) (batch 1 only), got {pv.shape}")
    H, W = pv.shape[2], pv.shape[3]
    if H < PATCH or W < PATCH or H % PATCH or W % PATCH:
        raise ValueError(f"pixel_values height/width must be positive multiples of {PATCH}, got {H}x{W}")
    if not np.issubdtype(pv.dtype, np.floating):
        raise ValueError(f"pixel_values must be a float array (normalised), got dtype {pv.dtype}")
    pv = pv.astype(np.float32, copy=False)
    if not np.isfinite(pv).all():
        raise ValueError("pixel_values contains NaN or Inf")
    h, w = H // PATCH, W // PATCH
    crops = pv.reshape(1, 3, h, PATCH, w, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(h * w, 3, PATCH, PATCH)
    return np.ascontiguousarray(np.concatenate([global_view(pv), crops], axis=0))


def encode_pixels(vit: CLIPVisionTower, vision_proj: nn.Cell, glb_GN, sub_GN, pixel_values: np.ndarray,
                  use_jit: bool = False, return_layout: bool = False):
    """(1,3,H,W) normalised pixels -> image embeddings (1, N, llm_hidden) in the projector's dtype.

    Global view = torch-exact bicubic to 560x560 (numpy matrices); the ViT sees [global, crops] in one
    batch; then the GN layout and vision_proj. With return_layout=True also returns the pre-projector
    layout (1, N, 4C)."""
    if not isinstance(vit, CLIPVisionTower):
        raise TypeError(f"encode_pixels: vit must be a CLIPVisionTower, got {type(vit).__name__}")
    views = split_views(pixel_values)
    h, w = pixel_values.shape[2] // PATCH, pixel_values.shape[3] // PATCH
    x = Tensor(views.astype(np_dtype(vit.compute_dtype)))
    feats = vit.forward_jit(x) if use_jit else vit(x)
    layout = global_local_layout(feats, h, w, glb_GN, sub_GN)
    n = expected_tokens(h, w)
    if layout.shape[1] != n:
        raise RuntimeError(f"encode_pixels: {layout.shape[1]} image tokens for a {h}x{w} grid, expected {n}")
    proj_dtype = vision_proj[0].weight.dtype
    emb = vision_proj(ops.cast(layout, proj_dtype))
    return (emb, layout) if return_layout else emb

"""The CLIP vision tower of IXC2.5 on MindSpore (HF CLIPVisionModel parameter names, last layer, CLS dropped)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import VisionConfig
from .cells import LayerNorm, PatchConv, Table, TowerCell, attend, dense, param
from .clip_spec import CLIPSpec


class CLIPEmbeddings(nn.Cell):
    """Patch conv + class token + all grid*grid+1 learned positions (no interpolation)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = param((c,), dtype)
        self.patch_embedding = PatchConv(cfg.num_channels, c, cfg.patch_size, dtype)
        self.position_embedding = Table(cfg.num_positions, c, dtype)

    def construct(self, pixel_values):
        x = self.patch_embedding(pixel_values)  # (B, C, grid, grid)
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
        self.scale = (c // self.heads) ** -0.5
        self.q_proj = dense(c, c, dtype)
        self.k_proj = dense(c, c, dtype)
        self.v_proj = dense(c, c, dtype)
        self.out_proj = dense(c, c, dtype)
        self.fused_attention = None  # fused CPU attention (ixc25_ms.fused_attention), set with the kernels

    def construct(self, x):
        out = attend(self.q_proj(x) * self.scale, self.k_proj(x), self.v_proj(x), self.heads, self.fused_attention)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    """fc1 -> quick_gelu (or exact gelu) -> fc2."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, dtype)

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


class CLIPVisionTower(TowerCell):
    """IXC2.5 vision tower: (B,3,R,R) -> last-layer patch features (B,grid*grid,C), CLS dropped, no post-LN
    (R = image_size: 560 and a 40x40 grid for the real ViT-L/14).

    Parameters are named `vision_tower.vision_model.…` as in the checkpoint under `vit.`. Compute runs in
    `dtype` (float32 or float16); LayerNorm and softmax run in fp32. `forward_jit` is the graph-compiled
    twin of `construct` (one compile per batch size)."""

    def __init__(self, vision_cfg: VisionConfig, dtype=ms.float32):
        if not isinstance(vision_cfg, VisionConfig):
            raise TypeError(f"CLIPVisionTower needs a VisionConfig, got {type(vision_cfg).__name__}")
        super().__init__(vision_cfg, CLIPSpec.geometry(vision_cfg), dtype)
        self.vision_tower = _VisionModel(vision_cfg, self.compute_dtype)

    def construct(self, pixel_values):
        x = ops.cast(pixel_values, self.compute_dtype)
        h = self.vision_tower(x)
        return h[:, 1:, :]

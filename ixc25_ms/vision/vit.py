"""A plain ViT tower with timm VisionTransformer names on MindSpore (fused qkv, final norm used, CLS dropped)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config import VisionConfig
from .cells import LayerNorm, PatchConv, TowerCell, attend, dense, param
from .vit_spec import TimmViTSpec


class Attention(nn.Cell):
    """timm Attention: qkv Linear(C, 3C) read as (3, heads, head_dim) -> softmax(q k^T * scale) v -> proj."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        c = cfg.hidden_size
        self.c = c
        self.heads = cfg.num_attention_heads
        self.scale = (c // self.heads) ** -0.5
        self.qkv = dense(c, 3 * c, dtype)
        self.proj = dense(c, c, dtype)
        self.fused_attention = None  # fused CPU attention (ixc25_ms.fused_attention), set with the kernels

    def construct(self, x):
        qkv = self.qkv(x)  # (B, N, 3C): [q | k | v], each C = heads x head_dim
        c = self.c
        q, k, v = qkv[:, :, :c], qkv[:, :, c:2 * c], qkv[:, :, 2 * c:]
        return self.proj(attend(q * self.scale, k, v, self.heads, self.fused_attention))


class Mlp(nn.Cell):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, dtype)

    def construct(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate="none"))


class Block(nn.Cell):
    """Pre-LN block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.attn = Attention(cfg, dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = Mlp(cfg, dtype)

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Cell):
    """Holds `proj` (conv with bias), as timm's PatchEmbed."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.proj = PatchConv(cfg.num_channels, cfg.hidden_size, cfg.patch_size, dtype, bias=True)

    def construct(self, x):
        return self.proj(x)


class VisionTransformer(nn.Cell):
    """timm VisionTransformer.forward_features: patch_embed, cls_token + pos_embed, blocks, norm."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        c = cfg.hidden_size
        self.patch_embed = _PatchEmbed(cfg, dtype)
        self.cls_token = param((1, 1, c), dtype)
        self.pos_embed = param((1, cfg.num_positions, c), dtype)
        self.blocks = nn.CellList([Block(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm(c, cfg.layer_norm_eps, dtype)

    def construct(self, pixel_values):
        x = self.patch_embed(pixel_values)  # (B, C, grid, grid)
        b, c = x.shape[0], x.shape[1]
        x = ops.transpose(ops.reshape(x, (b, c, -1)), (0, 2, 1))
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (b, 1, c))
        x = ops.concat((cls, x), axis=1) + ops.cast(self.pos_embed, x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class TimmViTTower(TowerCell):
    """A second IXC vision tower: (B,3,R,R) -> final-norm patch features (B,grid*grid,C), CLS dropped
    (448 px / patch 16 by default: 28x28 patches, 14x14 merged tokens per view).

    Parameters are named `vision_tower.<timm name>` (checkpoint keys `vit.vision_tower.…`). Compute in `dtype`;
    LayerNorm and softmax in fp32. `forward_jit` is the graph-compiled twin of `construct`."""

    def __init__(self, vision_cfg: VisionConfig, dtype=ms.float32):
        if not isinstance(vision_cfg, VisionConfig):
            raise TypeError(f"TimmViTTower needs a VisionConfig, got {type(vision_cfg).__name__}")
        super().__init__(vision_cfg, TimmViTSpec.geometry(vision_cfg), dtype)
        self.vision_tower = VisionTransformer(vision_cfg, self.compute_dtype)

    def construct(self, pixel_values):
        h = self.vision_tower(ops.cast(pixel_values, self.compute_dtype))
        return h[:, 1:, :]

"""Plain-PyTorch reference of the timm-style ViT tower (timm VisionTransformer.forward_features semantics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parity_tests.reference.vision import VisionReference


class TimmViTReference(VisionReference):
    """The IXC vision path with a timm ViT tower: the GN layout and projector of VisionReference, the tower
    written from timm's VisionTransformer (patch conv with bias, cls_token, pos_embed, pre-LN blocks with a
    fused qkv, final norm) over official keys `vit.vision_tower.<timm name>`; CLS dropped."""

    def __init__(self, state_dict, vision_cfg, dtype=torch.float32):
        super().__init__(state_dict, vision_cfg, dtype)
        self.p = "vit.vision_tower."

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """(B,3,R,R) -> (B,grid²+1,C): patch conv (+bias), cls_token first, pos_embed added."""
        p, w = self.p, self.w
        x = F.conv2d(views.to(self.dtype), w[p + "patch_embed.proj.weight"], w[p + "patch_embed.proj.bias"],
                     stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([w[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
        return x + w[p + "pos_embed"]

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i: x + proj(attn(norm1 x)) with qkv read as (3, heads, head_dim); x + fc2(gelu(fc1(norm2 x)))."""
        p = f"{self.p}blocks.{i}."
        b, n, c = x.shape
        d = c // self.heads
        qkv = self._lin(self._ln(x, p + "norm1"), p + "attn.qkv").reshape(b, n, 3, self.heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        a = torch.softmax(((q * d ** -0.5) @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        x = x + self._lin((a @ v).transpose(1, 2).reshape(b, n, c), p + "attn.proj")
        h = F.gelu(self._lin(self._ln(x, p + "norm2"), p + "mlp.fc1"))
        return x + self._lin(h, p + "mlp.fc2")

    def tower_rows(self, views: torch.Tensor):
        """(row, tensor) in order: 'embeddings' (what block 0 sees), 'layers.{i}', then 'features' = the
        final-norm output without CLS (B,grid²,C)."""
        x = self.embed(views)
        yield "embeddings", x
        for i in range(self.layers):
            x = self.layer(i, x)
            yield f"layers.{i}", x
        yield "features", self._ln(x, self.p + "norm")[:, 1:]

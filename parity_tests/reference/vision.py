"""Plain-PyTorch reference of the IXC2.5 vision path (CLIP tower, GN layout, projector), written from the spec."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CROP = 560  # default crop side; an instance uses its config's image_size (self.crop, self.half)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_rgb(img_u8: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (1,3,H,W) float32: /255 then CLIP mean/std (torch arithmetic)."""
    x = torch.from_numpy(np.ascontiguousarray(img_u8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


class VisionReference:
    """The vision path as plain torch functions over a state dict with official key names."""

    def __init__(self, state_dict: Dict[str, np.ndarray], vision_cfg, dtype=torch.float32):
        g = (lambda k: getattr(vision_cfg, k)) if not isinstance(vision_cfg, dict) else vision_cfg.__getitem__
        self.hidden = g("hidden_size")
        self.heads = g("num_attention_heads")
        self.layers = g("num_hidden_layers")
        self.patch = g("patch_size")
        self.eps = g("layer_norm_eps")
        self.act = g("hidden_act")
        self.crop = g("image_size")
        self.half = self.crop // self.patch // 2  # merged tokens per side (20 at 560/14)
        self.dtype = dtype
        self.w = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype) for k, v in state_dict.items()}
        self.p = "vit.vision_tower.vision_model."

    def _ln(self, x, name):
        return F.layer_norm(x.float(), (self.hidden,), self.w[name + ".weight"].float(),
                            self.w[name + ".bias"].float(), self.eps).to(x.dtype)

    def _lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    # ----- tower
    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """(B,3,R,R) -> (B,grid²+1,C) (1601 at 560/14): patch conv, CLS token first, learned positions added."""
        p = self.p + "embeddings."
        x = F.conv2d(views.to(self.dtype), self.w[p + "patch_embedding.weight"], stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        cls = self.w[p + "class_embedding"].view(1, 1, -1).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.w[p + "position_embedding.weight"].unsqueeze(0)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Encoder layer i: pre-LN attention and MLP with residuals."""
        p = f"{self.p}encoder.layers.{i}."
        b, n, c = x.shape
        d = c // self.heads
        h = self._ln(x, p + "layer_norm1")
        q = self._lin(h, p + "self_attn.q_proj") * d ** -0.5
        k = self._lin(h, p + "self_attn.k_proj")
        v = self._lin(h, p + "self_attn.v_proj")
        q, k, v = (t.view(b, n, self.heads, d).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        o = (a @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self._lin(o, p + "self_attn.out_proj")
        h = self._lin(self._ln(x, p + "layer_norm2"), p + "mlp.fc1")
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self._lin(h, p + "mlp.fc2")

    def tower_rows(self, views: torch.Tensor):
        """(row, tensor) in order: 'embeddings', 'pre_layrnorm', 'layers.{i}', then 'features' = the last
        encoder layer output without CLS and without post_layernorm (B,grid²,C)."""
        x = self.embed(views)
        yield "embeddings", x
        x = self._ln(x, self.p + "pre_layrnorm")
        yield "pre_layrnorm", x
        for i in range(self.layers):
            x = self.layer(i, x)
            yield f"layers.{i}", x
        yield "features", x[:, 1:]

    def tower(self, views: torch.Tensor) -> torch.Tensor:
        """(B,3,R,R) -> the tower's patch features (B,grid²,C): the last of tower_rows."""
        for _, x in self.tower_rows(views):  # intermediate rows are dropped as they come
            pass
        return x

    # ----- image -> views -> layout -> projector
    @staticmethod
    def views(pixel_values: torch.Tensor, crop: int = CROP) -> Tuple[torch.Tensor, int, int]:
        """(1,3,H,W) -> ([global bicubic crop-px view, row-major crops], h, w) using torch's own bicubic."""
        _, c, H, W = pixel_values.shape
        h, w = H // crop, W // crop
        glb = F.interpolate(pixel_values.float(), size=(crop, crop), mode="bicubic", align_corners=False)
        crops = pixel_values.reshape(1, c, h, crop, w, crop).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, crop, crop)
        return torch.cat([glb, crops.float()], dim=0), h, w

    def layout(self, feats: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(1+hw,grid²,C) -> (1,N,4C): 2x2 merge; global rows + sub_GN, glb_GN, local grid rows + sub_GN."""
        n, _, c = feats.shape
        q = self.half  # 20 at 560/14
        m = feats.view(n, q, 2, q, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, q, q, 4 * c)
        sub = self.w["plora_sub_GN"].to(m.dtype).reshape(1, 1, 4 * c)
        glb = self.w["plora_glb_GN"].to(m.dtype).reshape(1, 4 * c)
        g = torch.cat([m[0], sub.expand(q, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
        loc = m[1:].reshape(h, w, q, q, 4 * c).permute(0, 2, 1, 3, 4).reshape(h * q, w * q, 4 * c)
        loc = torch.cat([loc, sub.expand(h * q, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
        out = torch.cat([g, glb, loc], dim=0).unsqueeze(0)
        assert out.shape[1] == (h * w + 1) * q * q + 1 + (h + 1) * q
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """vision_proj: Linear -> exact GELU -> Linear."""
        return self._lin(F.gelu(self._lin(x, "vision_proj.0")), "vision_proj.2")

    @torch.no_grad()
    def encode(self, pixel_values) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1,3,H,W) normalised pixels -> (layout (1,N,4C), embeddings (1,N,hidden))."""
        pv = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32))
        views, h, w = self.views(pv, self.crop)
        lay = self.layout(self.tower(views), h, w)
        return lay, self.project(lay)

"""The timm-style plain ViT tower's declaration: key names and shapes, converter rows, defaults (no MindSpore)."""
from __future__ import annotations

from typing import Dict, List

from .tower import KeyRow, Shape, TowerSpec

VIT_PREFIX = "vit.vision_tower."  # TimmViTTower.vision_tower holds a timm VisionTransformer's state dict


class TimmViTSpec(TowerSpec):
    """A plain ViT with timm `VisionTransformer` names (ViT-B/16 at 448 px by default: a 28x28 patch grid,
    14x14 merged tokens per view).

    patch_embed.proj (conv with bias) -> cat(cls_token) + pos_embed (grid*grid+1 learned positions) ->
    blocks.N (norm1 -> attn.qkv fused [3C, C] (q, k, v blocks) -> attn.proj; norm2 -> mlp.fc1 -> exact GELU ->
    mlp.fc2) -> final `norm` (used, as timm's forward_features) -> CLS dropped. LayerNorm eps 1e-6 by default."""

    model_type = "timm_vit"
    defaults: Dict[str, object] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "image_size": 448, "patch_size": 16,
                                   "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    activations = ("gelu",)
    lora_targets = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    key_slots = {
        "bnorm": r"norm[12]",                                                     # block norms
        "attn": r"qkv|proj",                                                      # fused qkv, output proj
        "fc": r"fc[12]",
    }
    cells = "ixc25_ms.vision.vit:TimmViTTower"

    @classmethod
    def parameters(cls, v) -> Dict[str, Shape]:
        c, i, p = v.hidden_size, v.intermediate_size, VIT_PREFIX
        out: Dict[str, Shape] = {
            p + "cls_token": (1, 1, c),
            p + "pos_embed": (1, v.num_positions, c),
            p + "patch_embed.proj.weight": (c, v.num_channels, v.patch_size, v.patch_size),
            p + "patch_embed.proj.bias": (c,),
        }
        for n in range(v.num_hidden_layers):
            q = f"{p}blocks.{n}."
            for name, shape in (("norm1.weight", (c,)), ("norm1.bias", (c,)),
                                ("attn.qkv.weight", (3 * c, c)), ("attn.qkv.bias", (3 * c,)),
                                ("attn.proj.weight", (c, c)), ("attn.proj.bias", (c,)),
                                ("norm2.weight", (c,)), ("norm2.bias", (c,)),
                                ("mlp.fc1.weight", (i, c)), ("mlp.fc1.bias", (i,)),
                                ("mlp.fc2.weight", (c, i)), ("mlp.fc2.bias", (c,))):
                out[q + name] = shape
        out[p + "norm.weight"] = (c,)
        out[p + "norm.bias"] = (c,)
        return out

    @classmethod
    def key_rows(cls) -> List[KeyRow]:
        T = VIT_PREFIX
        return [
            (T + "cls_token",                                    T + "cls_token"),
            (T + "pos_embed",                                    T + "pos_embed"),
            (T + "patch_embed.proj.{wb}",                        T + "patch_embed.proj.{wb}"),
            (T + "blocks.{n}.{bnorm}.{wb}",                      T + "blocks.{n}.{bnorm}.{wb}"),
            (T + "blocks.{n}.attn.{attn}.{wb}",                  T + "blocks.{n}.attn.{attn}.{wb}"),
            (T + "blocks.{n}.mlp.{fc}.{wb}",                     T + "blocks.{n}.mlp.{fc}.{wb}"),
            (T + "norm.{wb}",                                    T + "norm.{wb}"),
        ]

"""The CLIP tower's declaration: HF CLIPVisionModel key names and shapes, converter rows, geometry (no MindSpore)."""
from __future__ import annotations

from typing import Dict, List

from .tower import KeyRow, Shape, TowerSpec

CLIP_PREFIX = "vit.vision_tower.vision_model."  # CLIPVisionTower.vision_tower (CLIPVisionModel).vision_model


class CLIPSpec(TowerSpec):
    """The official IXC2.5 tower: HF CLIP vision model (ViT-L/14 at 560 px by default, VisionConfig's defaults).

    Features = last encoder layer, CLS dropped, post_layernorm held but unused; patch conv without bias."""

    model_type = "clip_vision_model"
    defaults: Dict[str, object] = {}  # VisionConfig's own defaults are CLIP ViT-L/14-560
    activations = ("quick_gelu", "gelu")
    lora_targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                    "mlp.fc2")
    key_slots = {
        "ln": r"layer_norm[12]",                                                  # block norms
        "vln": r"pre_layrnorm|post_layernorm",                                    # outer norms (sic)
        "proj": r"q_proj|k_proj|v_proj|out_proj",
        "fc": r"fc[12]",
    }
    cells = "ixc25_ms.vision.clip:CLIPVisionTower"

    @classmethod
    def parameters(cls, v) -> Dict[str, Shape]:
        c, p = v.hidden_size, CLIP_PREFIX
        out: Dict[str, Shape] = {
            p + "embeddings.class_embedding": (c,),
            p + "embeddings.patch_embedding.weight": (c, v.num_channels, v.patch_size, v.patch_size),
            p + "embeddings.position_embedding.weight": (v.num_positions, c),
            p + "pre_layrnorm.weight": (c,),
            p + "pre_layrnorm.bias": (c,),
        }
        for n in range(v.num_hidden_layers):
            q = f"{p}encoder.layers.{n}."
            for ln in ("layer_norm1", "layer_norm2"):
                out[f"{q}{ln}.weight"] = (c,)
                out[f"{q}{ln}.bias"] = (c,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{q}self_attn.{proj}.weight"] = (c, c)
                out[f"{q}self_attn.{proj}.bias"] = (c,)
            out[f"{q}mlp.fc1.weight"] = (v.intermediate_size, c)
            out[f"{q}mlp.fc1.bias"] = (v.intermediate_size,)
            out[f"{q}mlp.fc2.weight"] = (c, v.intermediate_size)
            out[f"{q}mlp.fc2.bias"] = (c,)
        out[p + "post_layernorm.weight"] = (c,)
        out[p + "post_layernorm.bias"] = (c,)
        return out

    @classmethod
    def key_rows(cls) -> List[KeyRow]:
        V = CLIP_PREFIX
        return [
            (V + "embeddings.class_embedding",                   V + "embeddings.class_embedding"),
            (V + "embeddings.patch_embedding.weight",            V + "embeddings.patch_embedding.weight"),
            (V + "embeddings.position_embedding.weight",         V + "embeddings.position_embedding.weight"),
            (V + "{vln}.{wb}",                                   V + "{vln}.{wb}"),
            (V + "encoder.layers.{n}.{ln}.{wb}",                 V + "encoder.layers.{n}.{ln}.{wb}"),
            (V + "encoder.layers.{n}.self_attn.{proj}.{wb}",     V + "encoder.layers.{n}.self_attn.{proj}.{wb}"),
            (V + "encoder.layers.{n}.mlp.{fc}.{wb}",             V + "encoder.layers.{n}.mlp.{fc}.{wb}"),
            (V + "embeddings.position_ids",                      None),  # a buffer the model recomputes
        ]

"""Every IXC2.5 parameter under its official key name, with the shape the config implies (the CLIP part apart)."""
from __future__ import annotations

from typing import Dict, Tuple

from ..config import IXCConfig

Shape = Tuple[int, ...]

PLORA_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
LORA_NAMES = ("Plora", "lora_sft", "lora_dpo", "lora_web")


def linear_dims(cfg: IXCConfig) -> Dict[str, Tuple[int, int]]:
    """(in_features, out_features) of every PLoRA linear of a decoder layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "attention.wqkv": (h, cfg.qkv_out),
        "attention.wo": (cfg.num_attention_heads * cfg.head_dim, h),
        "feed_forward.w1": (h, i),
        "feed_forward.w2": (i, h),
        "feed_forward.w3": (h, i),
    }


def lora_rank(cfg: IXCConfig, name: str) -> int:
    return cfg.web_lora_r if name == "lora_web" else cfg.lora_r


def llm_layer_parameters(cfg: IXCConfig, n: int) -> Dict[str, Shape]:
    """Parameters of decoder layer `n` (PLoRA linears; attention bias only when cfg.bias, MLP never)."""
    p = f"model.layers.{n}."
    out: Dict[str, Shape] = {}
    for lin, (fin, fout) in linear_dims(cfg).items():
        out[f"{p}{lin}.weight"] = (fout, fin)
        if cfg.bias and lin.startswith("attention."):
            out[f"{p}{lin}.bias"] = (fout,)
        for lora in LORA_NAMES:
            r = lora_rank(cfg, lora)
            out[f"{p}{lin}.{lora}_A.weight"] = (r, fin)
            out[f"{p}{lin}.{lora}_B.weight"] = (fout, r)
    out[f"{p}attention_norm.weight"] = (cfg.hidden_size,)
    out[f"{p}ffn_norm.weight"] = (cfg.hidden_size,)
    return out


# ------------------------------------------------------------------------------------ CLIP vision tower
VIT_PREFIX = "vit.vision_tower.vision_model."


def vit_parameters(cfg: IXCConfig) -> Dict[str, Shape]:
    """CLIP vision tower (HF CLIPVisionModel names; patch conv without bias)."""
    v = cfg.vision
    c, p = v.hidden_size, VIT_PREFIX
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


# ------------------------------------------------------------------------------------ the whole model
def expected_parameters(cfg: IXCConfig) -> Dict[str, Shape]:
    """{official key: shape} for the whole model, in a stable order (LLM, ViT, projector, GN tokens)."""
    h, m = cfg.hidden_size, cfg.vit_merged_dim
    out: Dict[str, Shape] = {"model.tok_embeddings.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        out.update(llm_layer_parameters(cfg, n))
    out["model.norm.weight"] = (h,)
    out["output.weight"] = (cfg.vocab_size, h)
    out.update(vit_parameters(cfg))
    out["vision_proj.0.weight"] = (h, m)
    out["vision_proj.0.bias"] = (h,)
    out["vision_proj.2.weight"] = (h, h)
    out["vision_proj.2.bias"] = (h,)
    out["plora_glb_GN"] = (1, 1, m)
    out["plora_sub_GN"] = (1, 1, 1, m)
    return out


def num_parameters(cfg: IXCConfig) -> int:
    total = 0
    for shape in expected_parameters(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total

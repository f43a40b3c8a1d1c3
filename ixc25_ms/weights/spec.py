"""Every IXC2.5 parameter under its official key name, with the shape the config implies (the tower brings its own)."""
from __future__ import annotations

from typing import Dict, Tuple

from ..config import IXCConfig
from ..vision.registry import vision_parameters

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


# ------------------------------------------------------------------------------------ the vision tower
def vit_parameters(cfg: IXCConfig) -> Dict[str, Shape]:
    """The vision tower's parameters, from the tower vision_config selects (ixc25_ms.vision.registry)."""
    return vision_parameters(cfg.vision)


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

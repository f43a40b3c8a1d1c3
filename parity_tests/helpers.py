"""Tester helpers: tiny configs, random weights under official names, MindSpore + reference builders."""
from __future__ import annotations

import os

import numpy as np

from ixc25_ms.config import IXCConfig

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "tests", "data", "official-tiny")
VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")


def tiny_config(**over) -> IXCConfig:
    d = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
             rope_scaling=None, lora_r=8, lora_alpha=8, web_lora_r=16,
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    d.update(over)
    return IXCConfig.from_dict(d)


def random_lm_state(cfg: IXCConfig, seed: int = 0) -> dict:
    """Random weights for every language-model parameter, scaled so activations stay O(1)."""
    from ixc25_ms.language import InternLM2ForCausalLM
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(p.shape) for k, p in InternLM2ForCausalLM(cfg).parameters_and_names()}
    out = {}
    for k, s in shapes.items():
        if k.endswith("norm.weight"):
            out[k] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        elif k.endswith("tok_embeddings.weight"):
            out[k] = rng.standard_normal(s).astype(np.float32)
        else:
            out[k] = (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
    return out


def build_ms_lm(cfg, state, dtype="float32", use_jit=False, cpu_kernels=None):
    from ixc25_ms.language import InternLM2ForCausalLM
    from ixc25_ms.weights.loader import assign_state_dict
    lm = InternLM2ForCausalLM(cfg, dtype=dtype, use_jit=use_jit, cpu_kernels=cpu_kernels)
    assign_state_dict(lm, state, "test state", ignore_prefixes=VISION_PREFIXES)
    return lm


def load_golden():
    """(config, state dict, expected tensors) of the official tiny golden case."""
    from ixc25_ms.weights.layout import load_state_dict
    cfg = IXCConfig.from_file(GOLDEN)
    return cfg, load_state_dict(GOLDEN), dict(np.load(os.path.join(GOLDEN, "expected.npz")))

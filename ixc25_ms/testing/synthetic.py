"""A synthetic IXC2.5: the bench configs, seeded random weights under official names (param_spec), a drawn image."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

# ixc25-bench's default: a scaled-down LLM with the real vocabulary and a 4-layer ViT-L-wide tower at 560/14
DEFAULT_CFG = {
    "vocab_size": 92544, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "max_position_embeddings": 32768, "bias": False,
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
                      "num_attention_heads": 16, "image_size": 560, "patch_size": 14},
}
# ixc25-bench --quick (tests, graph_ops): seconds, not minutes
QUICK_CFG = {
    "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "max_position_embeddings": 32768, "bias": False, "lora_r": 8, "web_lora_r": 8,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 560, "patch_size": 14},
}
LM_PREFIXES = ("model.", "output.")


def make_image(width=700, height=300) -> np.ndarray:
    """A deterministic HxWx3 uint8 picture (700x300 -> 1 global view + 2 crops, 1,241 image tokens)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) % 256)], -1)
    return img.astype(np.uint8)


def synthetic_state(cfg, seed: int, lm_only: bool = False) -> Dict[str, np.ndarray]:
    """The bench's weights for every official key (param_spec order): norm weights 1, biases 0, others
    N(0, 0.02). lm_only: the language-model keys only (the same values: they come first)."""
    from ..weights.spec import expected_parameters
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_parameters(cfg).items():
        if lm_only and not name.startswith(LM_PREFIXES):
            continue
        if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight",
                          "layernorm.weight")):
            state[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            state[name] = np.zeros(shape, np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= 0.02
            state[name] = a
    return state


NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "layer_norm1.weight", "layer_norm2.weight",
                 "layrnorm.weight", "layernorm.weight")
TABLE_SUFFIXES = ("tok_embeddings.weight",)


def scaled_init(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    """Weights that keep activations O(1): norm weights 1 + 0.1 N, the token table N(0, 1), other tensors
    N / sqrt(fan_in) (fan_in = prod(shape[1:]); a vector's own length)."""
    if name.endswith(NORM_SUFFIXES):
        a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith(TABLE_SUFFIXES):
        a = rng.standard_normal(shape)
    else:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[-1]
        a = rng.standard_normal(shape) / np.sqrt(fan_in)
    return a.astype(np.float32)


def random_lm_state(cfg, seed: int = 0, rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """scaled_init weights for every language-model parameter, drawn in the MindSpore LM's parameter order."""
    from ..language import InternLM2ForCausalLM
    rng = np.random.default_rng(seed) if rng is None else rng
    shapes = {k: tuple(p.shape) for k, p in InternLM2ForCausalLM(cfg).parameters_and_names()}
    return {k: scaled_init(k, s, rng) for k, s in shapes.items()}


def random_state(cfg, seed: int = 0, lm_only: bool = False) -> Dict[str, np.ndarray]:
    """scaled_init weights for the whole model: random_lm_state(cfg, seed), then (same generator) the vision
    tower, projector and GN tokens in param_spec order."""
    from ..weights.spec import expected_parameters
    rng = np.random.default_rng(seed)
    state = random_lm_state(cfg, rng=rng)
    if not lm_only:
        for k, s in expected_parameters(cfg).items():
            if k not in state:
                state[k] = scaled_init(k, s, rng)
    return state

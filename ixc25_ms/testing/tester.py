"""TinyModelTester: one tiny IXC2.5 for tests (config, seeded weights, checkpoint dir, MindSpore model, reference)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Dict, Optional

import numpy as np

from ..config import IXCConfig
from .synthetic import LM_PREFIXES, random_state, synthetic_state

# the language-parity tests' model: 2 layers, GQA 4/2, every LoRA branch; a 2-layer CLIP at 560/14
TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                   rope_scaling=None, lora_r=8, lora_alpha=8, web_lora_r=16,
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4))
VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
INITS = ("scaled", "bench")


def tiny_config_dict(**over) -> dict:
    """TINY_CONFIG with top-level keys replaced by `over` (vision_config=... replaces the whole vision dict)."""
    d = copy.deepcopy(TINY_CONFIG)
    d.update(over)
    return d


def tiny_config(**over) -> IXCConfig:
    """The IXCConfig of tiny_config_dict(**over)."""
    return IXCConfig.from_dict(tiny_config_dict(**over))


def build_ms_lm(cfg: IXCConfig, state, dtype="float32", use_jit=False, cpu_kernels=None):
    """A MindSpore InternLM2ForCausalLM filled from `state` (official keys; vision keys ignored)."""
    from ..language import InternLM2ForCausalLM
    from ..weights.loader import assign_state_dict
    lm = InternLM2ForCausalLM(cfg, dtype=dtype, use_jit=use_jit, cpu_kernels=cpu_kernels)
    assign_state_dict(lm, state, "test state", ignore_prefixes=VISION_PREFIXES)
    return lm


class TinyModelTester:
    """One small IXC2.5 built the same way everywhere (transformers' ModelTester / mlx-lm's test runner style).

    config: a config dict (e.g. synthetic.QUICK_CFG) or None for TINY_CONFIG; `overrides` replace its top-level
    keys. init: 'scaled' (scaled_init, activations O(1): parity tests) or 'bench' (synthetic_state: norms 1,
    biases 0, N(0, 0.02)). Weights are drawn on first use and kept until `release()`."""

    def __init__(self, config: Optional[dict] = None, seed: int = 0, init: str = "scaled", **overrides):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.config = copy.deepcopy(TINY_CONFIG if config is None else dict(config))
        self.config.update(overrides)
        self.cfg = IXCConfig.from_dict(self.config, where="TinyModelTester config")
        self.seed, self.init = seed, init
        self._state: Optional[Dict[str, np.ndarray]] = None
        self._lm_only = True

    # ---------------------------------------------------------------------------------------------- weights
    def _draw(self, lm_only: bool) -> Dict[str, np.ndarray]:
        fn = random_state if self.init == "scaled" else synthetic_state
        return fn(self.cfg, self.seed, lm_only=lm_only)

    @property
    def state(self) -> Dict[str, np.ndarray]:
        """{official key: float32 array} for every parameter of the model (param_spec keys)."""
        if self._state is None or self._lm_only:
            self._state, self._lm_only = self._draw(False), False
        return self._state

    @property
    def lm_state(self) -> Dict[str, np.ndarray]:
        """The language-model keys only (the same values as in `state`; the vision tower is not drawn)."""
        if self._state is None:
            self._state, self._lm_only = self._draw(True), True
        return {k: v for k, v in self._state.items() if k.startswith(LM_PREFIXES)}

    def vision_state(self) -> Dict[str, np.ndarray]:
        """The vision tower, projector and GN tokens."""
        return {k: v for k, v in self.state.items() if k.startswith(VISION_PREFIXES)}

    def release(self) -> None:
        """Drop the drawn weights (a later use draws them again, identically)."""
        self._state = None

    # ---------------------------------------------------------------------------------------------- MindSpore
    def ms_lm(self, dtype="float32", use_jit=False, cpu_kernels=None):
        """The MindSpore language model with these weights."""
        return build_ms_lm(self.cfg, self.lm_state, dtype, use_jit, cpu_kernels)

    def ms_model(self, dtype="float32", use_jit=False):
        """The whole MindSpore IXC2.5 (tower, projector, LLM) with these weights; no tokenizer attached."""
        from ..weights.loader import assign_state_dict
        from ..model import InternLMXComposer2ForCausalLM
        model = InternLMXComposer2ForCausalLM(self.cfg, dtype=dtype, use_jit=use_jit)
        assign_state_dict(model, self.state, f"synthetic weights (seed {self.seed})")
        return model

    # ---------------------------------------------------------------------------------------------- reference
    def ref_lm(self, dtype=None):
        """Our PyTorch reference LLM (parity_tests.reference.language.RefLM; needs torch)."""
        import torch
        from parity_tests.reference.language import RefLM
        return RefLM(self.cfg, self.lm_state, dtype or torch.float32)

    def ref_vision(self, dtype=None):
        """Our PyTorch reference of the vision path, for the tower the config selects (needs torch)."""
        import torch
        from parity_tests.reference.towers import vision_reference
        return vision_reference(self.vision_state(), self.cfg.vision, dtype or torch.float32)

    # ---------------------------------------------------------------------------------------------- checkpoint
    def write_checkpoint(self, path: str, tokenizer: Optional[str] = None) -> str:
        """An official-layout directory: config.json, tokenizer.model (a copy of `tokenizer`, else a tiny one
        trained on the spot, ixc25_ms.tiny), model.safetensors (F32). Files are written under temporary names
        and renamed. Returns path."""
        from ..weights.safetensors import write_safetensors
        os.makedirs(path, exist_ok=True)
        tok = os.path.join(path, "tokenizer.model")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tok + ".tmp")
            os.replace(tok + ".tmp", tok)
        else:
            from ..tiny import MAX_VOCAB, MIN_VOCAB, train_tiny_tokenizer
            vocab = min(self.cfg.vocab_size, MAX_VOCAB)
            if vocab < MIN_VOCAB:
                raise ValueError(f"TinyModelTester.write_checkpoint: vocab_size {self.cfg.vocab_size} is below the "
                                 f"tiny tokenizer's minimum {MIN_VOCAB}; pass vocab_size >= {MIN_VOCAB} or a tokenizer")
            train_tiny_tokenizer(tok + ".tmp", vocab_size=vocab)
            os.replace(tok + ".tmp", tok)
        st = os.path.join(path, "model.safetensors")
        write_safetensors(st + ".tmp", {k: ("F32", v) for k, v in self.state.items()}, {"format": "pt"})
        os.replace(st + ".tmp", st)
        cfg = {"architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2", **self.config}
        with open(os.path.join(path, "config.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1)
        os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))
        return path

"""GenerationConfig: every generation setting in one object, built once per call (transformers 4.33 names)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..language import INFER_MODES


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default, applied when sampling
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    eos_token_id: Union[int, Sequence[int], None] = 2
    pad_token_id: int = 2
    bos_token_id: int = 1  # the placeholder transformers seeds input_ids with when given inputs_embeds
    infer_mode: str = "base"
    seed: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.infer_mode not in INFER_MODES:
            raise ValueError(f"infer_mode must be 'base', 'write' or 'web', got {self.infer_mode!r}")
        eos = self.eos_token_id
        self.eos_ids = [] if eos is None else ([int(eos)] if np.isscalar(eos) else [int(e) for e in eos])

    @classmethod
    def build(cls, model_cfg=None, **kwargs) -> "GenerationConfig":
        """The one constructor callers use: known fields from kwargs (others ignored, as transformers' generate
        passes model kwargs through); token ids not given default to the model config's (an explicit
        eos_token_id=None means no stop token)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in kwargs.items() if k in names}
        if model_cfg is not None:
            for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if k not in kw:
                    kw[k] = getattr(model_cfg, k)
        return cls(**kw)

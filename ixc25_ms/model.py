"""InternLMXComposer2ForCausalLM on MindSpore: vision tower + projector + InternLM2, with the official public API."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import initializer

from .fused_attention import use_fused_attention
from . import chat as _chat, compose as _compose
from .config import IXCConfig
from .dtypes import ms_dtype
from .generation import GenerationConfig, generate as _generate
from .language import InternLM2ForCausalLM
from .processing import preprocess_image
from .video import is_video_path, preprocess_video
from .vision import build_tower, build_vision_proj, encode_pixels
from .weights import CheckpointError
from .weights.layout import load_state_dict


@dataclass
class CausalLMOutput:
    logits: Tensor


class InternLMXComposer2ForCausalLM(InternLM2ForCausalLM):
    """IXC2.5: `vit` (the tower vision_config selects; CLIP ViT-L/14-560 by default), `vision_proj`,
    `plora_glb_GN`/`plora_sub_GN`, `model` + `output`.

    Parameter names equal the official checkpoint's, so loading is the identity. Methods mirror the
    official remote code: `encode_img`, `img2emb`, `interleav_wrap_chat`, `generate`, `chat`, plus
    `stream_chat` and the composition helpers in `ixc25_ms.chat`.
    """

    def __init__(self, cfg: IXCConfig, dtype="float32", use_jit: bool = False, flash_attention=None,
                 cpu_kernels=None):
        super().__init__(cfg, dtype=dtype, use_jit=use_jit, flash_attention=flash_attention, cpu_kernels=cpu_kernels)
        c4 = cfg.vit_merged_dim
        self.vit = build_tower(cfg.vision, self.compute_dtype)  # ixc25_ms.vision.registry
        self.vision_proj = build_vision_proj(c4, cfg.hidden_size, self.compute_dtype)
        self.plora_glb_GN = Parameter(initializer("zeros", (1, 1, c4), self.compute_dtype), name="plora_glb_GN")
        self.plora_sub_GN = Parameter(initializer("zeros", (1, 1, 1, c4), self.compute_dtype), name="plora_sub_GN")
        if self.cpu_kernels:  # the tower's attention too (the LLM's is set by the base class)
            use_fused_attention(self.vit)
        self.tokenizer = None
        self.hd_num = 24
        self.font_path = None  # video headers; None = the default font (see notes/vision.md)
        self.max_length = cfg.max_length
        self.timings = {}
        self.last_prompt = None  # the Prompt (ids, roles) of the last interleav_wrap_chat

    def timed(self, key: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its wall time added to `timings[key]`."""
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t

    # ------------------------------------------------------------------------------------------ vision
    def img2emb(self, pixel_values: np.ndarray) -> Tensor:
        """(1,3,H,W) normalised pixels (H, W multiples of the tower's resolution) -> embeddings (1, N, hidden)."""
        lean = self.memory_lean()  # big quantised models: the tower eagerly, one view at a time
        # on CPU one view per call too: one compiled graph for every view count, and a third of the activations
        # (mid int8, 3 views, run of 2026-12-04: 6.07 vs 6.67 s, peak growth 491 vs 1,221 MB)
        one = lean or ms.get_context("device_target") == "CPU"
        return encode_pixels(self.vit, self.vision_proj, self.plora_glb_GN, self.plora_sub_GN, pixel_values,
                             use_jit=self.use_jit and not lean, views_per_call=1 if one else 0)

    def encode_img(self, image, hd_num: int = 24) -> Tensor:
        """A path (image or video), PIL image or HxWx3 uint8 array -> image embeddings (1, N, hidden)."""
        crop = self.vit.resolution  # HD crops, padding and the global view follow the tower (560 for CLIP)
        if isinstance(image, (str, os.PathLike)) and is_video_path(image):
            pv = self.timed("preprocess_s", preprocess_video, image, font_path=self.font_path, crop=crop)
        else:
            pv = self.timed("preprocess_s", preprocess_image, image, hd_num=hd_num, crop=crop)
        return self.timed("vision_s", self.img2emb, pv)

    # ------------------------------------------------------------------------------------------ prompts
    def interleav_wrap_chat(self, query: str, image, history=(), meta_instruction: str = "",
                            max_length: int = 16384, hd_num: int = 24):
        """Official prompt assembly -> ({'inputs_embeds': Tensor(1,L,H)}, im_mask Tensor(1,L) bool, L)."""
        return _chat.interleav_wrap_chat(self, query, image, history, meta_instruction, max_length, hd_num)

    interleave_wrap_chat = interleav_wrap_chat

    def embed_prompt(self, prompt, image_embeds: Sequence[Tensor]) -> Tensor:
        """A Prompt's embeddings (1, L, H): text segments through tok_embeddings, image slot i from
        image_embeds[i] (1, n_i, H); slots whose image was not encoded (cut at max_length) end the prompt."""
        parts = []
        for seg in prompt.segments:
            if not seg.is_image:
                parts.append(self.embed(seg.ids[None]))
            elif seg.image < len(image_embeds):
                parts.append(image_embeds[seg.image].astype(self.compute_dtype))
        return ops.cat(parts, 1)

    # ------------------------------------------------------------------------------------------ forward / generate
    def construct(self, inputs_embeds=None, im_mask=None, attention_mask=None, infer_mode="base", input_ids=None):
        """Uncached forward: returns an object with `.logits` fp32 (B, L, V)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs inputs_embeds or input_ids")
            inputs_embeds = self.embed(input_ids)
        logits, _ = self.forward_hidden(inputs_embeds, im_mask, attention_mask, infer_mode)
        return CausalLMOutput(logits=logits)

    def generate(self, inputs_embeds=None, im_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
                 num_beams: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 repetition_penalty: float = 1.0, eos_token_id=None, infer_mode: str = "base", streamer=None,
                 attention_mask=None, input_ids=None, seed: Optional[int] = None, min_new_tokens: int = 0,
                 length_penalty: float = 1.0, **unused) -> np.ndarray:
        """Returns the new token ids (B, n). With `input_ids` (text only) the prompt ids also seed the
        repetition-penalty set, as transformers does; with `inputs_embeds` a placeholder BOS does."""
        gen = GenerationConfig.build(self.cfg, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                     do_sample=do_sample, num_beams=num_beams, temperature=temperature, top_p=top_p,
                                     top_k=top_k, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                     eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                                     infer_mode=infer_mode, seed=seed)
        prompt_ids = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("generate needs inputs_embeds or input_ids")
            prompt_ids = np.asarray(input_ids.asnumpy() if hasattr(input_ids, "asnumpy") else input_ids, np.int64)
            inputs_embeds = self.embed(prompt_ids)
        return self.timed("generate_s", _generate, self, inputs_embeds, im_mask, attention_mask, gen, streamer,
                          prompt_ids=prompt_ids)

    # ------------------------------------------------------------------------------------------ chat
    def chat(self, tokenizer, query: str, image=(), hd_num: int = 24, history=(), streamer=None,
             max_new_tokens: int = 1024, do_sample: bool = True, num_beams: int = 1, temperature: float = 1.0,
             top_p: float = 0.8, repetition_penalty: float = 1.005, infer_mode: str = "base", use_meta: bool = False,
             meta_instruction: str = _chat.META_INSTRUCTION, **kwargs):
        """One chat turn -> (response, history + [(query, response)]). Defaults as the official chat()."""
        return _chat.chat(self, tokenizer, query, image=image, hd_num=hd_num, history=history, streamer=streamer,
                          max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                          temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                          infer_mode=infer_mode, use_meta=use_meta, meta_instruction=meta_instruction, **kwargs)

    def batch_chat(self, tokenizer, queries, images=None, **kwargs) -> List[str]:
        """Several one-turn prompts in one left-padded batch -> responses (see ixc25_ms.batch.batch_chat)."""
        from .batch import batch_chat
        return batch_chat(self, tokenizer, queries, images, **kwargs)

    def stream_chat(self, tokenizer, query: str, image=(), **kwargs) -> Iterator[str]:
        """Like chat(), yielding text pieces as they decode (greedy or sampling)."""
        return _chat.stream_chat(self, tokenizer, query, image=image, **kwargs)

    def write_artical(self, *args, **kwargs):
        return _compose.write_artical(self, *args, **kwargs)

    def write_webpage(self, *args, **kwargs):
        return _compose.write_webpage(self, *args, **kwargs)

    def resume_2_webpage(self, *args, **kwargs):
        return _compose.resume_2_webpage(self, *args, **kwargs)

    def screen_2_webpage(self, *args, **kwargs):
        return _compose.screen_2_webpage(self, *args, **kwargs)


def read_weights(path: str, allow_pickle: bool = False):
    """State dict (numpy fp32) from an official-layout directory or one our converter wrote."""
    return load_state_dict(path, allow_pickle=allow_pickle)


def load(path: str, dtype: str = "float32", allow_pickle: bool = False, use_jit: bool = False,
         quantize: Optional[str] = None, lazy_loras: bool = True):
    """Load a checkpoint directory -> (InternLMXComposer2ForCausalLM, InternLM2Tokenizer).

    `path` holds config.json, tokenizer.model and weights (official layout: model.safetensors, sharded
    safetensors + index, or pytorch_model*.bin with allow_pickle=True; or our converted layout, also
    pre-quantised). quantize: None (as stored), "int8" or "fp16" (ixc25_ms.quantize); lazy_loras: the write/web
    LoRAs read on first use (default True; False: all in memory)."""
    from .quantize.load import load_weights
    from .tokenizer import InternLM2Tokenizer
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected config.json, tokenizer.model and weights)")
    dtype = ms_dtype(dtype, check_device=True)  # bf16 only where the device target has its kernels
    cfg = IXCConfig.from_file(path)
    tok = InternLM2Tokenizer.from_pretrained(path)
    model = InternLMXComposer2ForCausalLM(cfg, dtype=dtype, use_jit=use_jit)
    load_weights(model, path, allow_pickle, quantize, lazy_loras)  # checked from headers, then tensor by tensor
    model.tokenizer = tok
    return model, tok

"""The decoding loop on the KV cache (greedy and sampling) and the prompt buckets that bound compiled graphs."""
from __future__ import annotations

from typing import Optional

import numpy as np
from mindspore import Tensor, ops

from .config import GenerationConfig
from .sampling import make_warper, process, softmax

CAPACITY_BUCKET = 64  # cache slots are rounded up to this, so nearby prompt lengths share compiled graphs
PROMPT_BUCKET = 64  # under jit, prompts are left-padded to a multiple of this: O(1) compiled prefill graphs


def bucket_length(n: int, multiple: Optional[int]) -> int:
    """n rounded up to a multiple of `multiple` (n itself when multiple is None or <= 1)."""
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def capacity(n: int) -> int:
    """Cache slots for n tokens (prompt + new), bucketed."""
    return bucket_length(n, CAPACITY_BUCKET)


def left_pad(embeds, im_mask, attention_mask, pad: int):
    """Left-pads (B,L,H) embeddings with `pad` zero rows; im_mask (B,L) and attention_mask (B,L) with zeros
    (im_mask may be None and stays None). Positions come from the attention mask (cumsum - 1) and padded
    keys are masked, so the real positions' results are unchanged."""
    if pad <= 0:
        return embeds, im_mask, attention_mask
    b, _, h = (int(d) for d in embeds.shape)
    embeds = ops.cat([ops.zeros((b, pad, h), embeds.dtype), embeds], 1)
    attention_mask = np.concatenate([np.zeros((b, pad), np.int64), np.asarray(attention_mask, np.int64)], 1)
    if im_mask is not None:
        im_mask = np.asarray(im_mask)
        im_mask = np.concatenate([np.zeros((b, pad), im_mask.dtype), im_mask], 1)
    return embeds, im_mask, attention_mask


def _to_np(x):
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def prepare_prompt(lm, gen, inputs_embeds, im_mask=None, attention_mask=None, bucket: Optional[int] = PROMPT_BUCKET):
    """-> (embeds Tensor (B,L,H), im_mask (B,L) array or None, attention mask (B,L) int64). Under jit
    (`lm.use_jit`) the prompt is left-padded to a multiple of `bucket` so prompts of nearby lengths share one
    compiled prefill graph — not done eagerly (nothing to compile), nor when a dynamic-NTK RoPE would see a
    different length than the unpadded prompt (its state depends on the sequence length)."""
    if not isinstance(inputs_embeds, Tensor):
        inputs_embeds = Tensor(np.asarray(inputs_embeds))
    b, l = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
    am = np.ones((b, l), np.int64) if attention_mask is None else np.asarray(_to_np(attention_mask), np.int64).reshape(b, l)
    if im_mask is not None:
        im_mask = _to_np(im_mask).reshape(b, l)
    if not getattr(lm, "use_jit", False):
        return inputs_embeds, im_mask, am
    lp = bucket_length(l, bucket)
    rope = getattr(lm, "rope", None)
    if rope is not None and rope.type == "dynamic" and capacity(lp + gen.max_new_tokens) > rope.cached_len:
        return inputs_embeds, im_mask, am
    return left_pad(inputs_embeds, im_mask, am, lp - l)


def seed_sequences(gen, b: int, prompt_ids) -> np.ndarray:
    """The ids transformers' logits processors see before the first new token."""
    if prompt_ids is not None:
        return np.asarray(prompt_ids, np.int64).reshape(b, -1)
    return np.full((b, 1), gen.bos_token_id, np.int64)  # placeholder BOS of generate(inputs_embeds=...)


def generate(lm, inputs_embeds, im_mask=None, attention_mask=None, gen: Optional[GenerationConfig] = None,
             streamer=None, prompt_ids=None, **kwargs) -> np.ndarray:
    """Generate from prompt embeddings (B, L, H) with an `InternLM2ForCausalLM`-like `lm`.

    attention_mask (B, L) 0/1 for left-padded batches; prompt_ids (B, L) when the prompt came from ids
    (they join the repetition-penalty set and the beam length, as in transformers). Returns the new
    token ids (B, n) int64; rows that stopped early are padded with pad_token_id.
    `streamer.put(ids)` / `.end()` as transformers' streamers (greedy and sampling only).
    """
    gen = gen or GenerationConfig.build(getattr(lm, "cfg", None), **kwargs)
    embeds, im_mask, am = prepare_prompt(lm, gen, inputs_embeds, im_mask, attention_mask)
    if gen.num_beams > 1:
        if streamer is not None:
            raise ValueError("streaming is not supported with beam search (num_beams > 1)")
        from .beam import beam_search
        return beam_search(lm, embeds, im_mask, am, gen, prompt_ids)
    new_tokens = []
    for nxt in sample_steps(lm, embeds, im_mask, am, gen, prompt_ids):
        new_tokens.append(nxt)
        if streamer is not None:
            streamer.put(nxt)
    if streamer is not None:
        streamer.end()
    return np.stack(new_tokens, 1)


def iter_generate(lm, inputs_embeds, im_mask=None, attention_mask=None, gen: Optional[GenerationConfig] = None,
                  prompt_ids=None, **kwargs):
    """Greedy/sampling generation as an iterator of each step's new ids (B,)."""
    gen = gen or GenerationConfig.build(getattr(lm, "cfg", None), **kwargs)
    if gen.num_beams > 1:
        raise ValueError("streaming is not supported with beam search (num_beams > 1)")
    return sample_steps(lm, *prepare_prompt(lm, gen, inputs_embeds, im_mask, attention_mask), gen, prompt_ids)


def sample_steps(lm, embeds, im_mask, am, gen, prompt_ids):
    """Greedy or sampled decoding, one yielded (B,) id array per step."""
    b, l = am.shape
    rng = np.random.default_rng(gen.seed)
    warp = make_warper(gen)
    logits, _, cache = lm.prefill(embeds, im_mask, am, gen.infer_mode, cap=capacity(l + gen.max_new_tokens),
                                  last_only=True)
    seqs = seed_sequences(gen, b, prompt_ids)
    unfinished = np.ones(b, bool)
    for step in range(gen.max_new_tokens):
        scores = process(_to_np(logits)[:, -1, :].astype(np.float32), seqs, step, gen)
        if gen.do_sample:
            probs = softmax(warp(scores))
            nxt = np.array([rng.choice(probs.shape[-1], p=probs[r]) for r in range(b)], np.int64)
        else:
            nxt = scores.argmax(-1).astype(np.int64)
        nxt = np.where(unfinished, nxt, gen.pad_token_id)
        seqs = np.concatenate([seqs, nxt[:, None]], 1)
        yield nxt
        if gen.eos_ids:
            unfinished &= ~np.isin(nxt, gen.eos_ids)
        if not unfinished.any() or step == gen.max_new_tokens - 1:
            return
        logits, _ = lm.decode(nxt[:, None], cache, gen.infer_mode)

"""Batched chat: several prompts (each with its own images) left-padded into one generate call."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from mindspore import ops

from .chat import META_INSTRUCTION, chat_config, finish, prepare_chat
from .generation import PROMPT_BUCKET, bucket_length, generate, left_pad


def pad_batch(rows, bos_token_id: int, bucket: Optional[int] = PROMPT_BUCKET):
    """rows: [(embeds (1,L_i,H) Tensor, im_mask (1,L_i) bool-ish, prompt_ids (1,L_i) or None)] ->
    (embeds (B,L,H), im_mask (B,L) bool, attention_mask (B,L) int64, seed ids (B,L)), left-padded to
    L = bucket(max L_i). Padded positions: zero embeddings, attention 0, im_mask 0 (`generate.left_pad`,
    the same padding generate() applies to single prompts under jit).

    The seed ids feed only the repetition-penalty set, which is per-row *unique* ids: a row is padded
    with its own first id (or the placeholder BOS that generate(inputs_embeds=...) uses), so the set
    equals the single-prompt one."""
    lens = [int(e.shape[1]) for e, _, _ in rows]
    l = bucket_length(max(lens), bucket)
    embeds, masks, attn, seeds = [], [], [], []
    for (e, m, ids), n in zip(rows, lens):
        pad = l - n
        m = np.asarray(m.asnumpy() if hasattr(m, "asnumpy") else m, bool).reshape(1, n)
        e, m, a = left_pad(e.astype(rows[0][0].dtype), m, np.ones((1, n), np.int64), pad)
        embeds.append(e)
        masks.append(m[0])
        attn.append(a[0])
        ids = np.full(n, bos_token_id, np.int64) if ids is None else np.asarray(ids, np.int64).reshape(-1)
        seeds.append(np.concatenate([np.full(pad, ids[0], np.int64), ids]))
    return ops.cat(embeds, 0), np.stack(masks), np.stack(attn), np.stack(seeds)


def batch_chat(model, tokenizer, queries: Sequence[str], images=None, max_new_tokens: int = 1024,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 0.8, top_k: int = 50,
               repetition_penalty: float = 1.005, infer_mode: str = "base", hd_num: int = 24,
               use_meta: bool = False, meta_instruction: str = META_INSTRUCTION, seed: Optional[int] = None,
               bucket: Optional[int] = PROMPT_BUCKET, num_beams: int = 1, **unused) -> List[str]:
    """Responses for several one-turn prompts at once (greedy by default).

    images: None, or one entry per query: None (text-only path, as chat(image=None)), () / [] (no image,
    the interleaved path, as chat()'s default), an image, or a list of images. Each prompt is built as
    chat() builds it, the batch is left-padded to a multiple of `bucket`, and the rows are generated
    together; rows that finish early are padded. With greedy decoding each response equals the
    single-prompt chat() one. Sampling draws per row from one generator, so sampled responses differ
    from single-prompt runs with the same seed. Beam search is not batched (num_beams must be 1)."""
    if isinstance(queries, str):
        raise TypeError("batch_chat takes a list of queries (use chat() for one)")
    queries = list(queries)
    if not queries:
        return []
    if num_beams != 1:
        raise ValueError("batch_chat supports num_beams=1 only (use chat() for beam search)")
    if images is None:
        images = [()] * len(queries)
    images = list(images)
    if len(images) != len(queries):
        raise ValueError(f"batch_chat: {len(queries)} queries but {len(images)} image entries")
    rows = [prepare_chat(model, tokenizer, q, img, hd_num, (), use_meta, meta_instruction)
            for q, img in zip(queries, images)]
    embeds, im_mask, am, seeds = pad_batch(rows, model.cfg.bos_token_id, bucket)
    prompt_ids = seeds if any(ids is not None for _, _, ids in rows) else None
    gen = chat_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                      top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, infer_mode=infer_mode, seed=seed)
    out = generate(model, embeds, im_mask, am, gen, prompt_ids=prompt_ids)
    return [finish(tokenizer, row) for row in out]

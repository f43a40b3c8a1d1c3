"""Generation on the KV cache: greedy, sampling, beam search and repetition penalty, as transformers 4.33 does them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
from mindspore import Tensor, ops

CAPACITY_BUCKET = 64  # cache slots are rounded up to this, so nearby prompt lengths share compiled graphs
PROMPT_BUCKET = 64  # under jit, prompts are left-padded to a multiple of this: O(1) compiled prefill graphs


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
        if self.infer_mode not in ("base", "write", "web"):
            raise ValueError(f"infer_mode must be 'base', 'write' or 'web', got {self.infer_mode!r}")
        eos = self.eos_token_id
        self.eos_ids = [] if eos is None else ([int(eos)] if np.isscalar(eos) else [int(e) for e in eos])


# ------------------------------------------------------------------------------------------- logits processors
def repetition_penalty(scores: np.ndarray, seqs: np.ndarray, penalty: float) -> np.ndarray:
    """For each id in a row's sequence: score<0 -> score*penalty, else score/penalty (once per distinct id)."""
    if penalty == 1.0:
        return scores
    out = scores.copy()
    for r in range(scores.shape[0]):
        ids = np.unique(seqs[r])
        s = out[r, ids]
        out[r, ids] = np.where(s < 0, s * penalty, s / penalty)
    return out


def min_new_tokens_mask(scores: np.ndarray, n_new: int, min_new: int, eos_ids: List[int]) -> np.ndarray:
    if n_new < min_new and eos_ids:
        scores = scores.copy()
        scores[:, eos_ids] = -np.inf
    return scores


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(max(k, 1), scores.shape[-1])
    kth = np.sort(scores, -1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set whose probability exceeds p (transformers' ascending-cumsum rule, >= 1 token)."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, -1, kind="stable")
    sorted_s = np.take_along_axis(scores, order, -1)
    probs = softmax(sorted_s)
    remove = np.cumsum(probs, -1) <= (1 - p)
    remove[:, -1] = False
    out = scores.copy()
    np.put_along_axis(out, order, np.where(remove, -np.inf, sorted_s), -1)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, -1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = np.max(x, -1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


# ------------------------------------------------------------------------------------------- the loop
def bucket_length(n: int, multiple: Optional[int]) -> int:
    """n rounded up to a multiple of `multiple` (n itself when multiple is None or <= 1)."""
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def _capacity(n: int) -> int:
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


def _bucket_prompt(lm, gen, embeds, im_mask, am, bucket: Optional[int] = PROMPT_BUCKET):
    """Under jit (`lm.use_jit`), left-pads the prompt to a multiple of `bucket` so prompts of nearby lengths
    share one compiled prefill graph. Not done eagerly (nothing to compile), nor when a dynamic-NTK RoPE
    would see a different length than the unpadded prompt (its state depends on the sequence length)."""
    if not getattr(lm, "use_jit", False):
        return embeds, im_mask, am
    l = am.shape[1]
    lp = bucket_length(l, bucket)
    rope = getattr(lm, "rope", None)
    if rope is not None and rope.type == "dynamic" and _capacity(lp + gen.max_new_tokens) > rope.cached_len:
        return embeds, im_mask, am
    return left_pad(embeds, im_mask, am, lp - l)


def _to_np(x):
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _prepare(inputs_embeds, im_mask, attention_mask):
    if not isinstance(inputs_embeds, Tensor):
        inputs_embeds = Tensor(np.asarray(inputs_embeds))
    b, l = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
    am = np.ones((b, l), np.int64) if attention_mask is None else np.asarray(_to_np(attention_mask), np.int64).reshape(b, l)
    if im_mask is not None:
        im_mask = _to_np(im_mask).reshape(b, l)
    return inputs_embeds, im_mask, am


def _seed_seqs(gen, b, prompt_ids):
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
    gen = gen or GenerationConfig(**kwargs)
    inputs_embeds, im_mask, am = _bucket_prompt(lm, gen, *_prepare(inputs_embeds, im_mask, attention_mask))
    if gen.num_beams > 1:
        if streamer is not None:
            raise ValueError("streaming is not supported with beam search (num_beams > 1)")
        return _beam_search(lm, inputs_embeds, im_mask, am, gen, prompt_ids)
    new_tokens = []
    for nxt in _sample_steps(lm, inputs_embeds, im_mask, am, gen, prompt_ids):
        new_tokens.append(nxt)
        if streamer is not None:
            streamer.put(nxt)
    if streamer is not None:
        streamer.end()
    return np.stack(new_tokens, 1)


def iter_generate(lm, inputs_embeds, im_mask=None, attention_mask=None, gen: Optional[GenerationConfig] = None,
                  prompt_ids=None, **kwargs):
    """Greedy/sampling generation as an iterator of each step's new ids (B,)."""
    gen = gen or GenerationConfig(**kwargs)
    if gen.num_beams > 1:
        raise ValueError("streaming is not supported with beam search (num_beams > 1)")
    inputs_embeds, im_mask, am = _bucket_prompt(lm, gen, *_prepare(inputs_embeds, im_mask, attention_mask))
    return _sample_steps(lm, inputs_embeds, im_mask, am, gen, prompt_ids)


def _step_positions(am: np.ndarray) -> np.ndarray:
    return (am.sum(-1) - 1).astype(np.int64)  # position id of the last real token per row


def _sample_steps(lm, embeds, im_mask, am, gen, prompt_ids):
    b, l = am.shape
    cap = _capacity(l + gen.max_new_tokens)
    rng = np.random.default_rng(gen.seed)
    logits, _, ks, vs = lm.prefill(embeds, im_mask, am, gen.infer_mode, cap=cap, last_only=True)
    seqs = _seed_seqs(gen, b, prompt_ids)
    key_valid = np.zeros((b, cap), np.int64)
    key_valid[:, :l] = am
    pos = _step_positions(am)
    unfinished = np.ones(b, bool)
    for step in range(gen.max_new_tokens):
        scores = _to_np(logits)[:, -1, :].astype(np.float32)
        scores = repetition_penalty(scores, seqs, gen.repetition_penalty)
        scores = min_new_tokens_mask(scores, step, gen.min_new_tokens, gen.eos_ids)
        if gen.do_sample:
            if gen.temperature != 1.0:
                scores = scores / np.float32(gen.temperature)
            if gen.top_k:
                scores = top_k_filter(scores, gen.top_k)
            scores = top_p_filter(scores, gen.top_p)
            probs = softmax(scores)
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
        slot = l + step
        key_valid[:, slot] = 1
        pos = pos + 1
        logits, _, ks, vs = lm.decode(nxt[:, None], pos, slot, key_valid, ks, vs, gen.infer_mode)


class _Hyps:
    """Finished hypotheses of one batch row (transformers 4.33 BeamHypotheses, early_stopping=False)."""

    def __init__(self, num_beams, length_penalty):
        self.n, self.lp, self.beams, self.worst = num_beams, length_penalty, [], 1e9

    def add(self, hyp: np.ndarray, sum_logprobs: float):
        score = sum_logprobs / (len(hyp) ** self.lp)
        if len(self.beams) < self.n or score > self.worst:
            self.beams.append((score, hyp))
            if len(self.beams) > self.n:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.n:
            return False
        return self.worst >= best_sum_logprobs / cur_len ** self.lp


def _beam_search(lm, embeds, im_mask, am, gen, prompt_ids=None):
    b, l = am.shape
    nb = gen.num_beams
    cap = _capacity(l + gen.max_new_tokens)
    rep = np.repeat(np.arange(b), nb)  # embeddings, masks and im_mask repeated once per beam
    embeds = ops.gather(embeds, Tensor(rep.astype(np.int32)), 0)
    am = am[rep]
    im_mask = None if im_mask is None else im_mask[rep]
    logits, _, ks, vs = lm.prefill(embeds, im_mask, am, gen.infer_mode, cap=cap, last_only=True)
    seqs = _seed_seqs(gen, b, prompt_ids)[rep]
    n_prefix = seqs.shape[1]
    beam_scores = np.zeros((b, nb), np.float32)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.reshape(-1)
    hyps = [_Hyps(nb, gen.length_penalty) for _ in range(b)]
    done = np.zeros(b, bool)
    key_valid = np.zeros((b * nb, cap), np.int64)
    key_valid[:, :l] = am
    pos = _step_positions(am)
    max_len = n_prefix + gen.max_new_tokens
    n_top = max(2, 1 + len(gen.eos_ids)) * nb
    rng = np.random.default_rng(gen.seed)
    for step in range(gen.max_new_tokens):
        scores = log_softmax(_to_np(logits)[:, -1, :])
        scores = repetition_penalty(scores, seqs, gen.repetition_penalty)
        scores = min_new_tokens_mask(scores, step, gen.min_new_tokens, gen.eos_ids)
        v = scores.shape[-1]
        scores = (scores + beam_scores[:, None]).reshape(b, nb * v)
        if gen.do_sample:  # beam sampling: warp the accumulated scores, draw 2*beams without replacement
            warped = scores.reshape(b * nb, v)
            if gen.temperature != 1.0:
                warped = warped / np.float32(gen.temperature)
            if gen.top_k:
                warped = top_k_filter(warped, gen.top_k)
            warped = top_p_filter(warped, gen.top_p).reshape(b, nb * v)
            probs = softmax(warped)
            if (probs > 0).sum(-1).min() < n_top:
                raise ValueError(f"beam sampling needs {n_top} candidate tokens per row; top_k/top_p leave fewer")
            top = np.stack([rng.choice(nb * v, size=n_top, replace=False, p=probs[r]) for r in range(b)])
            top_scores = np.take_along_axis(warped, top, -1)
            order = np.argsort(-top_scores, -1, kind="stable")
            top, top_scores = np.take_along_axis(top, order, -1), np.take_along_axis(top_scores, order, -1)
        else:
            top = np.argsort(-scores, -1, kind="stable")[:, :n_top]
            top_scores = np.take_along_axis(scores, top, -1)
        next_scores = np.zeros((b, nb), np.float32)
        next_tokens = np.full((b, nb), gen.pad_token_id, np.int64)
        next_idx = np.zeros((b, nb), np.int64)
        cur_len = seqs.shape[1]
        for r in range(b):
            if done[r]:
                next_idx[r] = r * nb
                continue
            j = 0
            for rank in range(n_top):
                tok, src = int(top[r, rank] % v), r * nb + int(top[r, rank] // v)
                if tok in gen.eos_ids:
                    if rank >= nb:
                        continue
                    hyps[r].add(seqs[src].copy(), float(top_scores[r, rank]))
                else:
                    next_scores[r, j], next_tokens[r, j], next_idx[r, j] = top_scores[r, rank], tok, src
                    j += 1
                if j == nb:
                    break
            done[r] = done[r] or hyps[r].is_done(float(top_scores[r].max()), cur_len)
        beam_scores = next_scores.reshape(-1)
        idx = next_idx.reshape(-1)
        seqs = np.concatenate([seqs[idx], next_tokens.reshape(-1, 1)], 1)
        if done.all() or seqs.shape[1] >= max_len:
            break
        ks, vs = lm.reorder_cache(ks, idx), lm.reorder_cache(vs, idx)
        key_valid = key_valid[idx]
        slot = l + step
        key_valid[:, slot] = 1
        pos = pos[idx] + 1
        logits, _, ks, vs = lm.decode(next_tokens.reshape(-1, 1), pos, slot, key_valid, ks, vs,
                                      gen.infer_mode)
    # finalize: open beams join the hypotheses, the best one per row is returned
    for r in range(b):
        if done[r]:
            continue
        for j in range(nb):
            hyps[r].add(seqs[r * nb + j].copy(), float(beam_scores[r * nb + j]))
    best = [max(h.beams, key=lambda t: t[0])[1] for h in hyps]  # placeholder included, as transformers
    width = min(max(len(x) for x in best) + 1, max_len)
    out = np.full((b, width), gen.pad_token_id, np.int64)
    for r, x in enumerate(best):
        out[r, : len(x)] = x
        if len(x) < width and gen.eos_ids:
            out[r, len(x)] = gen.eos_ids[0]
    return out[:, n_prefix:]

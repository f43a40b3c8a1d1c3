"""Beam search (and beam sampling) on the KV cache, as transformers 4.33 does it."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from .generate import capacity, seed_sequences
from .sampling import log_softmax, make_warper, process, softmax


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


def _candidates(scores, b, nb, v, n_top, gen, warp, rng):
    """Top n_top (token*beam index, score) per row: greedy over the accumulated scores, or (beam sampling)
    drawn without replacement from the warped ones."""
    if not gen.do_sample:
        top = np.argsort(-scores, -1, kind="stable")[:, :n_top]
        return top, np.take_along_axis(scores, top, -1)
    warped = warp(scores.reshape(b * nb, v)).reshape(b, nb * v)
    probs = softmax(warped)
    if (probs > 0).sum(-1).min() < n_top:
        raise ValueError(f"beam sampling needs {n_top} candidate tokens per row; top_k/top_p leave fewer")
    top = np.stack([rng.choice(nb * v, size=n_top, replace=False, p=probs[r]) for r in range(b)])
    top_scores = np.take_along_axis(warped, top, -1)
    order = np.argsort(-top_scores, -1, kind="stable")
    return np.take_along_axis(top, order, -1), np.take_along_axis(top_scores, order, -1)


def beam_search(lm, embeds, im_mask, am, gen, prompt_ids=None):
    b, l = am.shape
    nb = gen.num_beams
    rep = np.repeat(np.arange(b), nb)  # embeddings, masks and im_mask repeated once per beam
    embeds = ops.gather(embeds, Tensor(rep.astype(np.int32)), 0)
    am = am[rep]
    im_mask = None if im_mask is None else im_mask[rep]
    logits, _, cache = lm.prefill(embeds, im_mask, am, gen.infer_mode, cap=capacity(l + gen.max_new_tokens),
                                  last_only=True)
    seqs = seed_sequences(gen, b, prompt_ids)[rep]
    n_prefix = seqs.shape[1]
    beam_scores = np.zeros((b, nb), np.float32)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.reshape(-1)
    hyps = [_Hyps(nb, gen.length_penalty) for _ in range(b)]
    done = np.zeros(b, bool)
    max_len = n_prefix + gen.max_new_tokens
    n_top = max(2, 1 + len(gen.eos_ids)) * nb
    rng = np.random.default_rng(gen.seed)
    warp = make_warper(gen)
    for step in range(gen.max_new_tokens):
        scores = process(log_softmax(np.asarray(logits.asnumpy())[:, -1, :]), seqs, step, gen)
        v = scores.shape[-1]
        top, top_scores = _candidates((scores + beam_scores[:, None]).reshape(b, nb * v), b, nb, v, n_top, gen,
                                      warp, rng)
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
        cache = cache.reorder(idx)
        logits, _ = lm.decode(next_tokens.reshape(-1, 1), cache, gen.infer_mode)
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

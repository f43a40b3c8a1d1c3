"""Logits processors and warpers with transformers 4.33 semantics, as small functions composed into chains."""
from __future__ import annotations

from typing import Callable, List

import numpy as np

Warper = Callable[[np.ndarray], np.ndarray]


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


def make_warper(gen) -> Warper:
    """temperature -> top-k -> top-p (transformers' warper order) as one function of the scores; the same chain
    serves sampling and beam sampling. Identity steps are left out."""
    chain: List[Warper] = []
    if gen.temperature != 1.0:
        t = np.float32(gen.temperature)
        chain.append(lambda s: s / t)
    if gen.top_k:
        chain.append(lambda s: top_k_filter(s, gen.top_k))
    if gen.top_p < 1.0:
        chain.append(lambda s: top_p_filter(s, gen.top_p))

    def warp(scores: np.ndarray) -> np.ndarray:
        for f in chain:
            scores = f(scores)
        return scores
    return warp


def process(scores: np.ndarray, seqs: np.ndarray, step: int, gen) -> np.ndarray:
    """The logits processors every decoding strategy applies first: repetition penalty, min_new_tokens."""
    scores = repetition_penalty(scores, seqs, gen.repetition_penalty)
    return min_new_tokens_mask(scores, step, gen.min_new_tokens, gen.eos_ids)

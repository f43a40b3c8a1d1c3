"""RoPE for InternLM2 (plain / linear / dynamic NTK, official semantics) and its host-side tables for the graphs."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np


class RotaryTable:
    """Host-side RoPE state with the official semantics (fp32 arithmetic as torch does it).

    'dynamic': the table starts at max_position_embeddings with the original base; a call with a longer
    sequence rebuilds inv_freq with base' = base*((f*L/max)-(f-1))^(d/(d-2)), and that state sticks.
    'linear': positions divided by the factor. cos/sin for given positions are computed on the host.
    """

    def __init__(self, head_dim: int, base: float, max_position_embeddings: int, scaling: Optional[dict] = None):
        self.dim, self.base, self.max_pos = head_dim, float(base), max_position_embeddings
        self.type = scaling["type"] if scaling else None
        self.factor = float(scaling["factor"]) if scaling else 1.0
        self.reset()

    def reset(self):
        """Back to the state of a freshly loaded model."""
        self._set(self.max_pos)

    def _set(self, seq_len: int):
        self.cached_len = seq_len
        base = self.base
        if self.type == "dynamic" and seq_len > self.max_pos:
            base = self.base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        exps = np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.dim)
        self.inv_freq = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)

    def ensure(self, seq_len: int):
        """Official: the cache is rebuilt only when a longer sequence than cached is seen."""
        if seq_len > self.cached_len:
            self._set(seq_len)

    def cos_sin(self, position_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """position_ids (B, L) -> cos, sin (B, L, head_dim) float32."""
        t = position_ids.astype(np.float32)
        if self.type == "linear":
            t = t / np.float32(self.factor)
        freqs = t[..., None] * self.inv_freq  # fp32 product, as torch.outer
        emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
        return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


@functools.lru_cache(maxsize=8)
def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R (d, d) with x @ R == rotate_half(x) = cat(-x2, x1) exactly (one +-1 per column)."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    r.setflags(write=False)  # cached: shared by every caller
    return r


def decode_rope_matrices(cos: np.ndarray, sin: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin (B, 1, d) of one decode position per row -> (Mq, Mk), each (B, d, d) fp32, with
    k @ Mk == k*cos + rotate_half(k)*sin (M = diag(cos) + R diag(sin)) and Mq = scale * M: RoPE and the
    softmax scale 1/sqrt(d) of q in one small matmul."""
    b, _, d = cos.shape
    m = rotate_half_matrix(d)[None] * sin[:, 0, None, :]  # R diag(sin): column j scaled by sin_j (a new array)
    idx = np.arange(d)
    m[:, idx, idx] += cos[:, 0]
    return m * np.float32(scale), m  # fp32: cos/sin and R are fp32


def qkv_rope_tables(cos: np.ndarray, sin: np.ndarray, kv_heads_groups: int,
                    q_scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin (B, L, d) -> (B, L, 1, G+2, d) for the fused qkv layout [q x G, k, v] of each KV group:
    the q and k slots get cos/sin, the v slot cos=1, sin=0 (so v passes through RoPE exactly unchanged).
    The q slots carry `q_scale` too (the softmax scale 1/sqrt(d), folded into RoPE: no L x L multiply)."""
    b, l, d = cos.shape
    g = kv_heads_groups
    c = np.ones((b, l, 1, g + 2, d), np.float32)
    s = np.zeros_like(c)
    c[:, :, 0, :g] = cos[:, :, None] * np.float32(q_scale)
    s[:, :, 0, :g] = sin[:, :, None] * np.float32(q_scale)
    c[:, :, 0, g] = cos
    s[:, :, 0, g] = sin
    return c, s

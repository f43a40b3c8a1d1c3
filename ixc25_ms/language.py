"""InternLM2 language model with partial LoRA on MindSpore: RMSNorm, RoPE (plain/linear/dynamic NTK), GQA over fused wqkv."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .config import IXCConfig
from .dtypes import ms_dtype, np_dtype
from .cpu_kernels import DecodeKernels, library_path as kernel_library, switch as cpu_kernels_switch
from .plora import PLoRA, Linear, full_mul

# causal query chunks in a last-token prefill: at least PREFILL_CHUNK rows each, at most PREFILL_MAX_CHUNKS
# chunks (bounds the graph), for prompts of two chunks or more (1,280 tokens: 128 rows 5.4-5.6 s, 256 rows
# 5.6 s, 512 rows 5.8 s, no chunks 6.0 s)
PREFILL_CHUNK = 128
PREFILL_MAX_CHUNKS = 16


def prefill_chunk_rows(l: int) -> int:
    """Rows per causal query chunk of an l-token last-token prefill; 0 = one pass (under two chunks)."""
    rows = max(PREFILL_CHUNK, -(-l // PREFILL_MAX_CHUNKS))
    return rows if l >= 2 * rows else 0


# ------------------------------------------------------------------------------------------------ RoPE
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


# ------------------------------------------------------------------------------------------------ layers
class Embedding(nn.Cell):
    """Token embedding with parameter `weight` (vocab, hidden), as the checkpoint."""

    def __init__(self, vocab: int, hidden: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (vocab, hidden), dtype), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """weight * (x * rsqrt(mean(x^2) + eps)) computed in fp32, cast back to the input dtype."""

    def __init__(self, hidden: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden,), dtype), name="weight")
        self.eps = eps
        # one token per row in fp32 (decode): 4 kernels instead of 6 — sum of squares as a dot product,
        # eps + ss/H and x*r*w each one Addcmul (the same value up to rounding order)
        self.dot = ops.BatchMatMul(transpose_b=True)
        self.addcmul = ops.Addcmul()
        self.eps_t = Tensor(np.float32(eps))
        self.inv_h = Tensor(np.float32(1.0 / hidden))
        self.one = Tensor(np.float32(1.0))
        self.zero = Tensor(np.zeros((1,), np.float32))

    def construct(self, x):
        in_dtype = x.dtype
        if x.shape[1] == 1 and in_dtype == ms.float32:
            r = ops.rsqrt(self.addcmul(self.eps_t, self.dot(x, x), self.inv_h, self.one))  # (B, 1, 1)
            return self.addcmul(self.zero, x, r, self.weight)
        h = x.astype(ms.float32)
        var = ops.mean(h * h, -1, True)
        h = full_mul(h, ops.rsqrt(var + self.eps))
        return full_mul(h.astype(in_dtype), self.weight)


class Attention(nn.Cell):
    """GQA over the fused wqkv laid out per KV group: [q_g0 .. q_g(G-1), k_g, v_g] for each group g."""

    def __init__(self, cfg: IXCConfig, dtype, flash: bool = False):
        super().__init__()
        self.flash = flash  # Ascend only: fused flash_attention_score for prefill (see notes/ascend.md)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.groups = cfg.num_kv_groups
        kw = dict(bias=cfg.bias, lora_r=cfg.lora_r, lora_scaling=cfg.lora_scaling, web_r=cfg.web_lora_r, dtype=dtype)
        self.wqkv = PLoRA(cfg.hidden_size, cfg.qkv_out, **kw)
        self.wo = PLoRA(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, **kw)
        self.index_add = ops.IndexAdd(axis=1)  # in place on a Parameter along the slot axis, CPU/GPU/Ascend
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T
        self.bmm = ops.BatchMatMul()
        self.matmul_r = ops.MatMul()
        self.rot_r = Tensor(rotate_half_matrix(self.head_dim), dtype)  # a constant, not a checkpoint parameter
        self.kernels = None  # fused CPU decode kernels (cpu_kernels.DecodeKernels), set by the LM

    def construct(self, x, im_mask, cos, sin, attn_mask, k_cache, v_cache, write_pos, cap, infer_mode,
                  last_row=False, chunk_rows=0):
        """x (B,L,H); attn_mask (B,1,L,L) in prefill, (B,1,1,C) over the cache slots in decode.
        Prefill (k_cache None): cos/sin (B,L,1,G+2,d) from `qkv_rope_tables` with the softmax scale in the q
        slots; the new keys fill slots [0, L) of a fresh cache of `cap` slots (cap >= L). With `last_row` only
        the last position's output is computed (B,1,H) — keys and values of all L as always. With
        `chunk_rows` the queries go in chunks of that many rows, each over the keys up to its last row only
        (causal: the rest are masked); rows whose every key is masked (left padding) then average over fewer
        values than in one pass, which nothing reads when only the last token's logits are wanted.
        Decode (L=1): cos/sin are the (B,d,d) RoPE matrices Mq (softmax scale folded in) and Mk from
        `decode_rope_matrices`; k_cache/v_cache are Parameters (B*kvh, C, d) whose slot `write_pos` ((1,)
        int32) is empty (zero): the new key/value is added into it in place (IndexAdd along the slot axis:
        0 + x == x exactly, nothing else of the cache is read or copied)."""
        if k_cache is not None:
            return self._decode(x, cos, sin, attn_mask, k_cache, v_cache, write_pos, cap, infer_mode)
        b, l, _ = x.shape
        d = self.head_dim
        qkv = self.wqkv(x, im_mask, infer_mode).reshape(b, l, self.kv_heads, self.groups + 2, d)
        # RoPE on q and k in one pass over the fused layout (v slots: cos 1, sin 0); rotate_half as x @ R
        rot = self.matmul_r(qkv.reshape(-1, d), self.rot_r).reshape(qkv.shape)
        qkv = full_mul(qkv, cos.astype(qkv.dtype)) + full_mul(rot, sin.astype(qkv.dtype))
        q, k, v = ops.split(qkv, [self.groups, 1, 1], axis=3)
        lq = l
        if last_row:  # the last layer of a last-token prefill: one query row, every key
            q, attn_mask, lq = q[:, -1:], attn_mask[:, :, -1:], 1
            im_mask = None if im_mask is None else im_mask[:, -1:]
        q = q.reshape(b, lq, self.heads, d).swapaxes(1, 2)  # (B, heads, Lq, d), scaled by 1/sqrt(d)
        k = k.reshape(b, l, self.kv_heads, d).swapaxes(1, 2)  # (B, kvh, L, d)
        v = v.reshape(b, l, self.kv_heads, d).swapaxes(1, 2)
        if self.flash:  # Ascend prefill: fused kernel, GQA native, mask 1 = masked
            out = ops.flash_attention_score(q, k, v, self.heads, attn_mask=(attn_mask < 0).astype(ms.uint8),
                                            scalar_value=1.0, input_layout="BNSD")
        elif chunk_rows and lq > chunk_rows:  # causal chunks: about half the L x L work at long prompts
            outs = []
            for s0 in range(0, lq, chunk_rows):
                e0 = min(lq, s0 + chunk_rows)
                outs.append(self._attend(q[:, :, s0:e0], k[:, :, :e0], v[:, :, :e0], attn_mask[:, :, s0:e0, :e0]))
            out = ops.cat(outs, 2)
        else:
            out = self._attend(q, k, v, attn_mask)
        out = out.swapaxes(1, 2).reshape(b, lq, self.heads * self.head_dim)
        if cap > l:  # a fresh cache of `cap` slots, the prompt in [0, L)
            pad = ops.zeros((b, self.kv_heads, cap - l, self.head_dim), k.dtype)
            k, v = ops.cat([k, pad], 2), ops.cat([v, pad], 2)
        return self.wo(out, im_mask, infer_mode), k, v

    def _attend(self, q, k, v, mask):
        """q (B,heads,Lq,d) pre-scaled, k/v (B,kvh,C,d), additive mask (B,1,Lq,C) -> (B,heads,Lq,d).
        GQA: kv head g serves query heads g*G .. g*G+G-1 (q regrouped, no repeated k/v)."""
        b, lq, c = q.shape[0], q.shape[2], k.shape[2]
        qg = q.reshape(b, self.kv_heads, self.groups * lq, self.head_dim)
        scores = self.bmm_qk(qg, k).reshape(b, self.heads, lq, c)
        scores = scores.astype(ms.float32)
        probs = ops.softmax(scores + ops.broadcast_to(mask, scores.shape), -1).astype(v.dtype)
        return ops.matmul(probs.reshape(b, self.kv_heads, self.groups * lq, c), v).reshape(
            b, self.heads, lq, self.head_dim)

    def _decode(self, x, mq, mk, attn_mask, k_cache, v_cache, write_pos, cap, infer_mode):
        """One new token per row (no image token): about half the kernels of the prefill path at L=1."""
        b, kvh, g, d = x.shape[0], self.kv_heads, self.groups, self.head_dim
        if self.kernels is not None:  # fused CPU kernel: the q/k/v split and RoPE in one (4 launches fewer)
            q, k, v = self.kernels.rope_split(self.wqkv(x, None, infer_mode), mq, mk)  # (B*kvh, G|1|1, d)
        else:
            qkv = self.wqkv(x, None, infer_mode).reshape(b, kvh, g + 2, d)
            q, k, v = ops.split(qkv, [g, 1, 1], axis=2)
            q = self.bmm(q.reshape(b, kvh * g, d), mq.astype(qkv.dtype))  # RoPE and 1/sqrt(d) in one matmul
            k = self.bmm(k.reshape(b, kvh, d), mk.astype(qkv.dtype))
        self.index_add(k_cache, write_pos, k.reshape(b * kvh, 1, d))
        self.index_add(v_cache, write_pos, v.reshape(b * kvh, 1, d))
        # the (B*kvh, C, d) Parameters are read as they are (a reshape of a Parameter is a copy on CPU)
        scores = self.bmm_qk(q.reshape(b * kvh, g, d), k_cache).reshape(b, kvh, g, cap)
        scores = scores.astype(ms.float32) + attn_mask  # (B, kvh, G, C) + (B, 1, 1, C)
        probs = ops.softmax(scores, -1).astype(v_cache.dtype).reshape(b * kvh, g, cap)
        out = self.bmm(probs, v_cache).reshape(b, 1, self.heads * d)
        return self.wo(out, None, infer_mode), None, None


class FeedForward(nn.Cell):
    """w2(silu(w1 x) * w3 x), every linear a PLoRA."""

    def __init__(self, cfg: IXCConfig, dtype):
        super().__init__()
        kw = dict(bias=False, lora_r=cfg.lora_r, lora_scaling=cfg.lora_scaling, web_r=cfg.web_lora_r, dtype=dtype)
        self.w1 = PLoRA(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.w3 = PLoRA(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.w2 = PLoRA(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.addcmul = ops.Addcmul()  # one kernel for both products
        self.zero = Tensor(np.zeros((1,), np_dtype(dtype)), dtype)
        self.kernels = None  # fused CPU decode kernels, set by the LM

    def construct(self, x, im_mask, infer_mode):
        a, b = self.w1(x, im_mask, infer_mode), self.w3(x, im_mask, infer_mode)
        if x.shape[1] == 1:  # decode: silu(a)*b in one kernel after Sigmoid, or one fused CPU kernel
            gated = self.kernels.swiglu(a, b) if self.kernels is not None else self.addcmul(self.zero, a,
                                                                                           ops.sigmoid(a), b)
            return self.w2(gated, im_mask, infer_mode)
        return self.w2(ops.silu(a) * b, im_mask, infer_mode)  # prefill: Addcmul is the slower kernel here


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: IXCConfig, dtype, flash: bool = False):
        super().__init__()
        self.attention = Attention(cfg, dtype, flash)
        self.feed_forward = FeedForward(cfg, dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, x, im_mask, cos, sin, attn_mask, k_cache, v_cache, write_pos, cap, infer_mode,
                  last_row=False, chunk_rows=0):
        """last_row: only the last position's output (B,1,H) (keys/values of every position); chunk_rows:
        causal query chunks (see Attention)."""
        a, k, v = self.attention(self.attention_norm(x), im_mask, cos, sin, attn_mask, k_cache, v_cache,
                                 write_pos, cap, infer_mode, last_row, chunk_rows)
        if last_row:
            x = x[:, -1:]
            im_mask = None if im_mask is None else im_mask[:, -1:]
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x), im_mask, infer_mode)
        return x, k, v


class InternLM2Model(nn.Cell):
    """tok_embeddings, layers, norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: IXCConfig, dtype=ms.float32, flash: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, dtype, flash) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.kernels = None

    def use_kernels(self, kernels):
        """Fused CPU decode kernels (cpu_kernels.DecodeKernels) for the decode step, or None for the portable ops."""
        self.kernels = kernels
        for layer in self.layers:
            layer.attention.kernels = kernels
            layer.feed_forward.kernels = kernels

    def _decode_fused(self, h, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode):
        """Decode with the fused kernels: each residual add goes into the norm after it (one kernel for both)."""
        n = len(self.layers)
        first = self.layers[0].attention_norm
        s, y = h, self.kernels.rms_norm(h, first.weight, first.eps_t)
        for i, layer in enumerate(self.layers):
            a, _, _ = layer.attention(y, None, cos, sin, attn_mask, k_caches[i], v_caches[i], write_pos, cap,
                                      infer_mode)
            s, y = self.kernels.add_rms_norm(s, a, layer.ffn_norm.weight, layer.ffn_norm.eps_t)
            f = layer.feed_forward(y, None, infer_mode)
            nxt = self.layers[i + 1].attention_norm if i + 1 < n else self.norm
            s, y = self.kernels.add_rms_norm(s, f, nxt.weight, nxt.eps_t)
        return y, (), ()

    def construct(self, h, im_mask, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode,
                  last_only=False):
        """Runs every layer; returns (normed hidden (B,L,H), k caches, v caches): in prefill the new caches
        (B,kvh,cap,d) per layer; in decode () and (), the given caches having been written in place.
        last_only (prefill): the last layer computes its output for the last position only (B,1,H): the
        other rows of it feed nothing (the caches hold keys/values, taken before); and attention runs in causal
        chunks (PREFILL_CHUNK, PREFILL_MAX_CHUNKS)."""
        if k_caches is not None and self.kernels is not None:
            return self._decode_fused(h, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode)
        ks, vs = (), ()
        n, l = len(self.layers), h.shape[1]
        last_token_prefill = last_only and k_caches is None and l > 1
        chunk_rows = prefill_chunk_rows(l) if last_token_prefill else 0
        for i, layer in enumerate(self.layers):
            kc = None if k_caches is None else k_caches[i]
            vc = None if v_caches is None else v_caches[i]
            h, k, v = layer(h, im_mask, cos, sin, attn_mask, kc, vc, write_pos, cap, infer_mode,
                            last_token_prefill and i == n - 1, chunk_rows)
            if k_caches is None:
                ks = ks + (k,)
                vs = vs + (v,)
        return self.norm(h), ks, vs


def flash_attention_switch(dtype, requested=None) -> bool:
    """Fused flash attention in prefill: only on Ascend with fp16/bf16 (the kernel exists nowhere else).
    None = automatic; True where it cannot run is an error rather than a silent fallback."""
    target = ms.get_context("device_target")
    ok = target == "Ascend" and dtype in (ms.float16, ms.bfloat16)
    if requested and not ok:
        raise ValueError(f"flash attention needs device_target 'Ascend' and float16/bfloat16 compute "
                         f"(have {target}, {dtype})")
    return ok if requested is None else bool(requested)


# ------------------------------------------------------------------------------------------------ host-side masks
MASK_MIN = float(np.finfo(np.float32).min)
CACHE_LAST = "_ixc25_last_slot"  # attribute of a cache Parameter: the highest slot written into it
_CACHE_IDS = itertools.count(1)  # unique names for KV-cache Parameters


def prefill_mask(attention_mask: np.ndarray) -> np.ndarray:
    """(B, L) 0/1 padding mask -> (B, 1, L, L) additive fp32: causal, padded keys masked."""
    b, l = attention_mask.shape
    allowed = np.tril(np.ones((l, l), dtype=bool))[None] & (attention_mask > 0)[:, None, :]
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float32)[:, None]


def decode_mask(key_valid: np.ndarray) -> np.ndarray:
    """(B, C) 0/1 valid cache slots (the new slot included) -> (B, 1, 1, C) additive fp32."""
    return np.where(key_valid > 0, 0.0, MASK_MIN).astype(np.float32)[:, None, None, :]


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Official generate: cumsum(mask)-1, padded positions set to 1."""
    pos = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


class InternLM2ForCausalLM(nn.Cell):
    """`model.*` + untied `output` head, with uncached forward and cached prefill/decode steps.

    The steps run eagerly (PyNative) or compiled with `mindspore.jit` (`use_jit=True`): the decode step
    has fixed shapes for a given batch and cache capacity, so it compiles once per generation setup.
    """

    def __init__(self, cfg: IXCConfig, dtype="float32", use_jit: bool = False, flash_attention=None,
                 cpu_kernels=None):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = ms_dtype(dtype)
        self.flash_attention = flash_attention_switch(self.compute_dtype, flash_attention)
        self.model = InternLM2Model(cfg, self.compute_dtype, self.flash_attention)
        # fused CPU decode kernels: None = IXC25_CPU_KERNELS (auto: CPU + fp32 + the library builds)
        self.cpu_kernels = cpu_kernels_switch(self.compute_dtype, cpu_kernels)
        if self.cpu_kernels:
            self.model.use_kernels(DecodeKernels(kernel_library(), cfg.num_key_value_heads, cfg.num_kv_groups))
        self.output = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=self.compute_dtype)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)
        self.q_scale = 1.0 / math.sqrt(cfg.head_dim)  # softmax scale, folded into q's RoPE on the host
        self.use_jit = use_jit

    # -- graph bodies ------------------------------------------------------------------------------
    def _body(self, h, im_mask, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode, last_only):
        if h.dtype == ms.int32:  # token ids (decode): the embedding lookup runs inside the graph
            h = self.model.tok_embeddings(h)
        h, ks, vs = self.model(h, im_mask, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode,
                               last_only)
        if last_only and h.shape[1] > 1:  # (a decode step has one row: no slice launched)
            h = h[:, -1:, :]
        logits = self.output(h).astype(ms.float32)
        return logits, h, ks, vs

    @ms.jit
    def _body_jit(self, h, im_mask, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode, last_only):
        return self._body(h, im_mask, cos, sin, attn_mask, k_caches, v_caches, write_pos, cap, infer_mode, last_only)

    def _run(self, *args):
        return self._body_jit(*args) if self.use_jit else self._body(*args)

    # -- public steps -------------------------------------------------------------------------------
    def embed(self, input_ids) -> Tensor:
        """input_ids (B, L) ints -> embeddings (B, L, H) in the compute dtype."""
        ids = Tensor(np.asarray(input_ids, dtype=np.int32))
        return self.model.tok_embeddings(ids)

    def _cast(self, x: Tensor) -> Tensor:
        return x if x.dtype == self.compute_dtype else x.astype(self.compute_dtype)  # no Cast op launched for nothing

    def _im_mask(self, im_mask, b, l):
        if im_mask is None:
            return None
        m = np.asarray(im_mask.asnumpy() if hasattr(im_mask, "asnumpy") else im_mask).reshape(b, l)
        if not m.any():
            return None  # no image position: the PLoRA branch adds nothing (official adds *0)
        return Tensor(m.astype(np_dtype(self.compute_dtype))[..., None])

    def _cos_sin(self, position_ids, kv_len):
        """RoPE tables for the layers: (B, L, 1, G+2, d) cos and sin (see `qkv_rope_tables`)."""
        self.rope.ensure(kv_len)
        cos, sin = qkv_rope_tables(*self.rope.cos_sin(position_ids), self.cfg.num_kv_groups, self.q_scale)
        return Tensor(cos), Tensor(sin)

    def prefill(self, inputs_embeds: Tensor, im_mask=None, attention_mask=None, infer_mode: str = "base",
                cap: Optional[int] = None, last_only: bool = True):
        """Runs the prompt. Returns (logits fp32 (B,1|L,V), hidden, k caches, v caches) with caches of
        `cap` slots (default L). attention_mask (B, L) 0/1, left padding allowed."""
        b, l = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
        cap = l if cap is None else int(cap)
        if cap < l:
            raise ValueError(f"cache capacity {cap} is smaller than the prompt length {l}")
        am = np.ones((b, l), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64).reshape(b, l)
        cos, sin = self._cos_sin(position_ids_from_mask(am), l)
        mask = Tensor(prefill_mask(am))
        logits, h, ks, vs = self._run(self._cast(inputs_embeds), self._im_mask(im_mask, b, l), cos,
                                      sin, mask, None, None, None, cap, infer_mode, last_only)
        return logits, h, self._as_cache(ks, l - 1), self._as_cache(vs, l - 1)

    @staticmethod
    def _as_cache(tensors, last: int) -> Tuple[Parameter, ...]:
        """(B, kvh, C, d) tensors -> Parameters (B*kvh, C, d) that decode writes in place (unique names),
        marked as holding slots up to `last` (decode refuses to add into those)."""
        out = tuple(Parameter(t.reshape((-1,) + tuple(t.shape[-2:])), name=f"kv_cache_{next(_CACHE_IDS)}",
                              requires_grad=False) for t in tensors)
        for p in out:
            setattr(p, CACHE_LAST, last)
        return out

    def reorder_cache(self, caches, index) -> Tuple[Parameter, ...]:
        """Beam search: new caches (same batch size) whose batch row i is row index[i] of `caches`."""
        index = np.asarray(index, np.int32).reshape(-1)
        b = len(index)
        idx = Tensor(index)
        out = []
        for c in caches:
            rows = int(c.shape[0])
            if rows % b:
                raise ValueError(f"cache with {rows} rows does not split into {b} batch rows")
            out.append(ops.gather(c.reshape((b, rows // b) + tuple(c.shape[1:])), idx, 0))
        return self._as_cache(out, max(getattr(c, CACHE_LAST, -1) for c in caches))

    def decode(self, inputs_embeds: Tensor, position_ids: np.ndarray, slot: int, key_valid: np.ndarray,
               k_caches, v_caches, infer_mode: str = "base"):
        """One cached step for (B,1,H) embeddings — or (B,1) token ids, embedded inside the step — written at
        cache slot `slot`; key_valid (B,C) marks valid slots (the new one included). Generated tokens carry no
        image mask. The caches from `prefill` are Parameters written in place; (B,kvh,C,d) tensors are
        accepted too and turned into such Parameters first (their invalid slots zeroed). Slots are appended:
        the new key/value is added into the empty (zero) slot in place, so slots must be decoded in increasing
        order: each cache Parameter remembers the highest slot written into it (by prefill, a decode step, or
        `reorder_cache`'s sources), and a slot at or before that is an error.
        Returns (logits (B,1,V), hidden, ks, vs) with the caches that were written."""
        b, kvh = int(inputs_embeds.shape[0]), self.cfg.num_key_value_heads
        # checked every step (~60 us for 2 x 8 caches); the caches' own marks say which slots they hold
        k_caches = self._check_caches(k_caches, b, key_valid, slot)
        v_caches = self._check_caches(v_caches, b, key_valid, slot)
        last = max(getattr(p, CACHE_LAST, -1) for p in k_caches + v_caches)
        if slot <= last:
            raise ValueError(f"cache slot {slot} of these caches is already written (they hold slots up to {last}: "
                             f"the prompt or an earlier decode step); decode appends, one new slot per step")
        ks, vs = k_caches, v_caches
        if self.use_jit:  # a plain tuple of graph outputs would be re-specialised (recompiled) every call
            ks, vs = ms.mutable(ks), ms.mutable(vs)
        c = int(k_caches[0].shape[1])
        if not 0 <= slot < c:
            raise ValueError(f"cache slot {slot} is outside the cache capacity {c}")
        self.rope.ensure(slot + 1)
        cos, sin = decode_rope_matrices(*self.rope.cos_sin(np.asarray(position_ids).reshape(-1, 1)), self.q_scale)
        cos, sin = Tensor(cos), Tensor(sin)
        write_pos = Tensor(np.array([slot], np.int32))
        mask = Tensor(decode_mask(key_valid))
        if isinstance(inputs_embeds, Tensor):
            x = self._cast(inputs_embeds)
        else:  # token ids (B, 1): embedded inside the step (no separate eager lookup)
            x = Tensor(np.asarray(inputs_embeds, np.int32).reshape(-1, 1))
        logits, h, _, _ = self._run(x, None, cos, sin, mask, ks, vs, write_pos, c, infer_mode, True)
        for p in k_caches + v_caches:  # the model keeps no reference: caches are freed when the caller drops them
            setattr(p, CACHE_LAST, slot)
        return logits, h, k_caches, v_caches

    def _check_caches(self, caches, b: int, key_valid, slot: int) -> Tuple[Parameter, ...]:
        caches = tuple(caches)
        kvh, d, n = self.cfg.num_key_value_heads, self.cfg.head_dim, self.cfg.num_hidden_layers
        if len(caches) != n:
            raise ValueError(f"expected {n} caches (one per layer), got {len(caches)}")
        if all(isinstance(c, Parameter) for c in caches):
            for c in caches:
                if len(c.shape) != 3 or c.shape[0] != b * kvh or c.shape[2] != d:
                    raise ValueError(f"cache of shape {tuple(c.shape)} is not (B*kvh, C, d) = ({b * kvh}, C, {d})")
                if c.dtype != self.compute_dtype:
                    raise ValueError(f"cache dtype {c.dtype} differs from the compute dtype {self.compute_dtype}")
            return caches
        out = []
        for c in caches:
            a = c.asnumpy() if isinstance(c, Tensor) else np.asarray(c)
            if a.ndim != 4 or a.shape[:2] != (b, kvh) or a.shape[3] != d:
                raise ValueError(f"cache of shape {tuple(a.shape)} is neither a prefill cache nor (B, kvh, C, d) = "
                                 f"({b}, {kvh}, C, {d})")
            keep = np.asarray(key_valid).reshape(b, -1)[:, : a.shape[2]] > 0
            keep[:, slot:slot + 1] = False  # the slot decode adds into must be empty
            out.append(self._cast(Tensor(np.where(keep[:, None, :, None], a, 0).astype(a.dtype))))
        return self._as_cache(out, slot - 1)

    def construct(self, inputs_embeds, im_mask=None, attention_mask=None, infer_mode="base"):
        """Uncached forward over the whole sequence: logits fp32 (B, L, V)."""
        return self.prefill(inputs_embeds, im_mask, attention_mask, infer_mode, last_only=False)[0]

"""InternLM2 decoder layers on MindSpore: embedding, RMSNorm, GQA attention over the fused wqkv, SwiGLU MLP."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import IXCConfig
from ..dtypes import np_dtype
from .linear import PLoRA, full_mul
from .rope import rotate_half_matrix


class Embedding(nn.Cell):
    """Token embedding with parameter `weight` (vocab, hidden), as the checkpoint."""

    def __init__(self, vocab: int, hidden: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (vocab, hidden), dtype), name="weight")
        self.compute_dtype = dtype  # rows come out in it (the table may be stored fp16: ixc25_ms.quantize)

    def construct(self, ids):
        y = ops.gather(self.weight, ids, 0)
        if self.weight.dtype != self.compute_dtype:
            y = y.astype(self.compute_dtype)
        return y


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
        if not self.training and x.shape[1] == 1 and in_dtype == ms.float32:  # (training: also dynamic shapes)
            r = ops.rsqrt(self.addcmul(self.eps_t, self.dot(x, x), self.inv_h, self.one))  # (B, 1, 1)
            return self.addcmul(self.zero, x, r, self.weight)
        h = x.astype(ms.float32)
        var = ops.mean(h * h, -1, True)
        h = full_mul(h, ops.rsqrt(var + self.eps))
        return full_mul(h.astype(in_dtype), self.weight)


def plora_kwargs(cfg: IXCConfig, dtype, bias: bool) -> dict:
    return dict(bias=bias, lora_r=cfg.lora_r, lora_scaling=cfg.lora_scaling, web_r=cfg.web_lora_r, dtype=dtype)


class Attention(nn.Cell):
    """GQA over the fused wqkv laid out per KV group: [q_g0 .. q_g(G-1), k_g, v_g] for each group g.

    Three entry points, one per use: `construct` (uncached, whole sequence: training and plain forward),
    `prefill` (the prompt, filling a fresh cache) and `decode` (one token, appended to the cache in place)."""

    def __init__(self, cfg: IXCConfig, dtype, flash: bool = False):
        super().__init__()
        self.flash = flash  # Ascend only: fused flash_attention_score for prefill (see notes/ascend.md)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.groups = cfg.num_kv_groups
        self.wqkv = PLoRA(cfg.hidden_size, cfg.qkv_out, **plora_kwargs(cfg, dtype, cfg.bias))
        self.wo = PLoRA(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, **plora_kwargs(cfg, dtype, cfg.bias))
        self.index_add = ops.IndexAdd(axis=1)  # in place on a Parameter along the slot axis, CPU/GPU/Ascend
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T
        self.bmm = ops.BatchMatMul()
        self.matmul_r = ops.MatMul()
        self.rot_r = Tensor(rotate_half_matrix(self.head_dim), dtype)  # a constant, not a checkpoint parameter
        self.kernels = None  # fused CPU decode kernels (cpu_kernels.DecodeKernels), set by the LM
        self.fused_attention = None  # fused CPU attention (ixc25_ms.fused_attention), set with the kernels

    def _qkv(self, x, im_mask, cos, sin, infer_mode):
        """x (B,L,H), cos/sin (B,L,1,G+2,d) from `qkv_rope_tables` (softmax scale in the q slots) ->
        q (B,L,kvh,G,d) scaled and rotated, k (B,L,kvh,1,d) rotated, v (B,L,kvh,1,d)."""
        b, l, _ = x.shape
        qkv = self.wqkv(x, im_mask, infer_mode).reshape(b, l, self.kv_heads, self.groups + 2, self.head_dim)
        # RoPE on q and k in one pass over the fused layout (v slots: cos 1, sin 0); rotate_half as x @ R
        rot = self.matmul_r(qkv.reshape(-1, self.head_dim), self.rot_r).reshape(qkv.shape)
        qkv = full_mul(qkv, cos.astype(qkv.dtype)) + full_mul(rot, sin.astype(qkv.dtype))
        return ops.split(qkv, [self.groups, 1, 1], axis=3)

    def _heads(self, q, k, v, b, l, lq):
        q = q.reshape(b, lq, self.heads, self.head_dim).swapaxes(1, 2)  # (B, heads, Lq, d), scaled by 1/sqrt(d)
        k = k.reshape(b, l, self.kv_heads, self.head_dim).swapaxes(1, 2)  # (B, kvh, L, d)
        v = v.reshape(b, l, self.kv_heads, self.head_dim).swapaxes(1, 2)
        return q, k, v

    def construct(self, x, im_mask, cos, sin, attn_mask, infer_mode):
        """Uncached forward: x (B,L,H), attn_mask (B,1,L,L) additive -> (B,L,H)."""
        b, l, _ = x.shape
        q, k, v = self._heads(*self._qkv(x, im_mask, cos, sin, infer_mode), b, l, l)
        if self.fused_attention is not None:  # no (heads, L, L) tensor in the graph
            out = self.fused_attention(q, k, v, attn_mask)[0]
        else:
            out = self._attend(q, k, v, attn_mask)
        out = out.swapaxes(1, 2).reshape(b, l, self.heads * self.head_dim)
        return self.wo(out, im_mask, infer_mode)

    def prefill(self, x, im_mask, cos, sin, attn_mask, cap, infer_mode, last_row=False, chunk_rows=0):
        """The prompt: -> (out, k, v) with k/v (B,kvh,cap,d) holding slots [0, L) (cap >= L).
        With `last_row` only the last position's output is computed (B,1,H) — keys and values of all L as
        always. With `chunk_rows` the queries go in chunks of that many rows, each over the keys up to its last
        row only (causal: the rest are masked); rows whose every key is masked (left padding) then average over
        fewer values than in one pass, which nothing reads when only the last token's logits are wanted."""
        b, l, _ = x.shape
        q, k, v = self._qkv(x, im_mask, cos, sin, infer_mode)
        lq = l
        if last_row:  # the last layer of a last-token prefill: one query row, every key
            q, attn_mask, lq = q[:, -1:], attn_mask[:, :, -1:], 1
            im_mask = None if im_mask is None else im_mask[:, -1:]
        q, k, v = self._heads(q, k, v, b, l, lq)
        if self.flash:  # Ascend prefill: fused kernel, GQA native, mask 1 = masked
            out = ops.flash_attention_score(q, k, v, self.heads, attn_mask=(attn_mask < 0).astype(ms.uint8),
                                            scalar_value=1.0, input_layout="BNSD")
        elif self.fused_attention is not None:  # CPU fp32: scores in the kernel's scratch, never a graph tensor
            out = self.fused_attention(q, k, v, attn_mask)[0]
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

    def decode(self, x, mq, mk, attn_mask, k_cache, v_cache, write_pos, infer_mode):
        """One new token per row (no image token): x (B,1,H); mq/mk (B,d,d) the RoPE matrices (softmax scale
        folded into mq) from `decode_rope_matrices`; attn_mask (B,1,1,C) over the cache slots; k_cache/v_cache
        Parameters (B*kvh, C, d) whose slot `write_pos` ((1,) int32) is empty (zero): the new key/value is added
        into it in place (IndexAdd along the slot axis: 0 + x == x exactly, nothing else is read or copied)."""
        b, kvh, g, d = x.shape[0], self.kv_heads, self.groups, self.head_dim
        cap = k_cache.shape[1]
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
        if self.kernels is not None:  # one kernel for scores, mask, softmax and the weighted sum
            out = self.kernels.decode_attn(q.reshape(b * kvh, g, d), k_cache, v_cache, attn_mask)
            return self.wo(out.reshape(b, 1, self.heads * d), None, infer_mode)
        scores = self.bmm_qk(q.reshape(b * kvh, g, d), k_cache).reshape(b, kvh, g, cap)
        scores = scores.astype(ms.float32) + attn_mask  # (B, kvh, G, C) + (B, 1, 1, C)
        probs = ops.softmax(scores, -1).astype(v_cache.dtype).reshape(b * kvh, g, cap)
        out = self.bmm(probs, v_cache).reshape(b, 1, self.heads * d)
        return self.wo(out, None, infer_mode)


class FeedForward(nn.Cell):
    """w2(silu(w1 x) * w3 x), every linear a PLoRA."""

    def __init__(self, cfg: IXCConfig, dtype):
        super().__init__()
        kw = plora_kwargs(cfg, dtype, False)
        self.w1 = PLoRA(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.w3 = PLoRA(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.w2 = PLoRA(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.addcmul = ops.Addcmul()  # one kernel for both products
        self.zero = Tensor(np.zeros((1,), np_dtype(dtype)), dtype)
        self.kernels = None  # fused CPU decode kernels, set by the LM

    def construct(self, x, im_mask, infer_mode):
        a, b = self.w1(x, im_mask, infer_mode), self.w3(x, im_mask, infer_mode)
        if not self.training and x.shape[1] == 1:  # decode: silu(a)*b in one kernel after Sigmoid, or fused
            gated = self.kernels.swiglu(a, b) if self.kernels is not None else self.addcmul(self.zero, a,
                                                                                           ops.sigmoid(a), b)
            return self.w2(gated, im_mask, infer_mode)
        return self.w2(ops.silu(a) * b, im_mask, infer_mode)  # prefill: Addcmul is the slower kernel here


class DecoderLayer(nn.Cell):
    """x + attention(attention_norm(x)), then + feed_forward(ffn_norm(x)); entry points as Attention's."""

    def __init__(self, cfg: IXCConfig, dtype, flash: bool = False):
        super().__init__()
        self.attention = Attention(cfg, dtype, flash)
        self.feed_forward = FeedForward(cfg, dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # True when its five linears are int8 in the CPU mat-vec's packed layout with no bias or LoRA: a base-mode
        # decode step then runs it as three fused kernels (decode_int8); set by ixc25_ms.quantize.prepare
        self.int8_block = False

    def decode_int8(self, s, y, mq, mk, attn_mask, k_cache, v_cache, write_pos, next_norm):
        """Base-mode decode of an int8_block layer on the fused CPU kernels: residual s and its norm y (B,1,H)
        -> (s', y') with y' normed by `next_norm`; the new key/value added into the caches in place as in
        Attention.decode. Equal to the separate kernels' path (the same arithmetic in the same order)."""
        att, ff, kern = self.attention, self.feed_forward, self.attention.kernels
        q, k, v = kern.qkv_int8(y, att.wqkv.weight, att.wqkv.weight_scale, mq, mk)  # (B*kvh, G|1|1, d)
        att.index_add(k_cache, write_pos, k)
        att.index_add(v_cache, write_pos, v)
        s, y = kern.attn_out_int8(q, k_cache, v_cache, attn_mask, att.wo.weight, att.wo.weight_scale, s,
                                  self.ffn_norm.weight, self.ffn_norm.eps_t)
        return kern.ffn_int8(y, ff.w1.weight, ff.w1.weight_scale, ff.w3.weight, ff.w3.weight_scale, ff.w2.weight,
                             ff.w2.weight_scale, s, next_norm.weight, next_norm.eps_t)

    def construct(self, x, im_mask, cos, sin, attn_mask, infer_mode):
        x = x + self.attention(self.attention_norm(x), im_mask, cos, sin, attn_mask, infer_mode)
        return x + self.feed_forward(self.ffn_norm(x), im_mask, infer_mode)

    def prefill(self, x, im_mask, cos, sin, attn_mask, cap, infer_mode, last_row=False, chunk_rows=0):
        """-> (x, k, v). last_row: only the last position's output (B,1,H) (keys/values of every position);
        chunk_rows: causal query chunks (see Attention.prefill)."""
        a, k, v = self.attention.prefill(self.attention_norm(x), im_mask, cos, sin, attn_mask, cap, infer_mode,
                                         last_row, chunk_rows)
        if last_row:
            x = x[:, -1:]
            im_mask = None if im_mask is None else im_mask[:, -1:]
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x), im_mask, infer_mode), k, v

    def decode(self, x, mq, mk, attn_mask, k_cache, v_cache, write_pos, infer_mode):
        x = x + self.attention.decode(self.attention_norm(x), mq, mk, attn_mask, k_cache, v_cache, write_pos,
                                      infer_mode)
        return x + self.feed_forward(self.ffn_norm(x), None, infer_mode)

"""InternLM2ForCausalLM on MindSpore: uncached forward, and cached prefill/decode steps (PyNative or mindspore.jit)."""
from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ..config import IXCConfig
from ..cpu_kernels import DecodeKernels, library_path as kernel_library, switch as cpu_kernels_switch
from ..fused_attention import use_fused_attention
from ..dtypes import ms_dtype, np_dtype
from .cache import KVCache, decode_mask, position_ids_from_mask, prefill_mask
from .layers import DecoderLayer, Embedding, RMSNorm
from .linear import Linear
from .rope import RotaryTable, decode_rope_matrices, qkv_rope_tables

# causal query chunks in a last-token prefill: at least PREFILL_CHUNK rows each, at most PREFILL_MAX_CHUNKS
# chunks (bounds the graph), for prompts of two chunks or more (1,280 tokens: 128 rows 5.4-5.6 s, 256 rows
# 5.6 s, 512 rows 5.8 s, no chunks 6.0 s)
PREFILL_CHUNK = 128
PREFILL_MAX_CHUNKS = 16


LEAN_DEQUANT_BYTES = 2 << 30  # above this, quantised models prefill eagerly (InternLM2ForCausalLM.memory_lean)


def prefill_chunk_rows(l: int) -> int:
    """Rows per causal query chunk of an l-token last-token prefill; 0 = one pass (under two chunks)."""
    rows = max(PREFILL_CHUNK, -(-l // PREFILL_MAX_CHUNKS))
    return rows if l >= 2 * rows else 0


def flash_attention_switch(dtype, requested=None) -> bool:
    """Fused flash attention in prefill: only on Ascend with fp16/bf16 (the kernel exists nowhere else).
    None = automatic; True where it cannot run is an error rather than a silent fallback."""
    target = ms.get_context("device_target")
    ok = target == "Ascend" and dtype in (ms.float16, ms.bfloat16)
    if requested and not ok:
        raise ValueError(f"flash attention needs device_target 'Ascend' and float16/bfloat16 compute "
                         f"(have {target}, {dtype})")
    return ok if requested is None else bool(requested)


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

    def construct(self, h, im_mask, cos, sin, attn_mask, infer_mode):
        """Uncached forward over (B, L, H) embeddings -> normed hidden states (B, L, H)."""
        for layer in self.layers:
            h = layer(h, im_mask, cos, sin, attn_mask, infer_mode)
        return self.norm(h)

    def prefill(self, h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_only=False):
        """-> (normed hidden (B,L|1,H), k caches, v caches (B,kvh,cap,d) per layer). last_only: the last layer
        computes its output for the last position only (the other rows of it feed nothing: the caches hold keys
        and values, taken before), and attention runs in causal chunks (PREFILL_CHUNK, PREFILL_MAX_CHUNKS)."""
        ks, vs = (), ()
        n, l = len(self.layers), h.shape[1]
        last_token = last_only and l > 1
        chunk_rows = prefill_chunk_rows(l) if last_token else 0
        for i, layer in enumerate(self.layers):
            h, k, v = layer.prefill(h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_token and i == n - 1,
                                    chunk_rows)
            ks = ks + (k,)
            vs = vs + (v,)
        return self.norm(h), ks, vs

    def decode(self, h, mq, mk, attn_mask, k_caches, v_caches, write_pos, infer_mode):
        """One token per row (B,1,H), appended to the caches in place -> normed hidden (B,1,H)."""
        if self.kernels is not None:  # fused: each residual add goes into the norm after it (one kernel for both)
            n = len(self.layers)
            first = self.layers[0].attention_norm
            s, y = h, self.kernels.rms_norm(h, first.weight, first.eps_t)
            for i, layer in enumerate(self.layers):
                if layer.int8_block and infer_mode == "base":  # three fused kernels for the whole layer
                    nxt = self.layers[i + 1].attention_norm if i + 1 < n else self.norm
                    s, y = layer.decode_int8(s, y, mq, mk, attn_mask, k_caches[i], v_caches[i], write_pos, nxt)
                    continue
                a = layer.attention.decode(y, mq, mk, attn_mask, k_caches[i], v_caches[i], write_pos, infer_mode)
                s, y = self.kernels.add_rms_norm(s, a, layer.ffn_norm.weight, layer.ffn_norm.eps_t)
                f = layer.feed_forward(y, None, infer_mode)
                nxt = self.layers[i + 1].attention_norm if i + 1 < n else self.norm
                s, y = self.kernels.add_rms_norm(s, f, nxt.weight, nxt.eps_t)
            return y
        for i, layer in enumerate(self.layers):
            h = layer.decode(h, mq, mk, attn_mask, k_caches[i], v_caches[i], write_pos, infer_mode)
        return self.norm(h)


class InternLM2ForCausalLM(nn.Cell):
    """`model.*` + untied `output` head: an uncached forward and cached prefill/decode steps over a KVCache.

    The steps run eagerly (PyNative) or compiled with `mindspore.jit` (`use_jit=True`): the decode step has
    fixed shapes for a given batch and cache capacity, so it compiles once per generation setup."""

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
            use_fused_attention(self.model, dtype=self.compute_dtype)  # uncached forward, prefill: no L x L tensor
        self.output = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=self.compute_dtype)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)
        self.q_scale = 1.0 / math.sqrt(cfg.head_dim)  # softmax scale, folded into q's RoPE on the host
        self.use_jit = use_jit
        self.quantization = None  # "int8" / "fp16": the LLM's weights stored so (ixc25_ms.quantize.prepare)
        self.lazy_loras = None    # write/web LoRAs loaded when an infer_mode first needs them (quantize.LazyLoras)
        self._dequant_bytes = None  # memory_lean's size, computed on first use

    # -- graph bodies ------------------------------------------------------------------------------
    def _forward_body(self, h, im_mask, cos, sin, attn_mask, infer_mode):
        h = self.model(h, im_mask, cos, sin, attn_mask, infer_mode)
        return self.output(h).astype(ms.float32), h

    def _prefill_body(self, h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_only):
        h, ks, vs = self.model.prefill(h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_only)
        if last_only and h.shape[1] > 1:
            h = h[:, -1:, :]
        return self.output(h).astype(ms.float32), h, ks, vs

    def _decode_body(self, x, mq, mk, attn_mask, k_caches, v_caches, write_pos, infer_mode):
        if x.dtype == ms.int32:  # token ids: the embedding lookup runs inside the graph
            x = self.model.tok_embeddings(x)
        h = self.model.decode(x, mq, mk, attn_mask, k_caches, v_caches, write_pos, infer_mode)
        return self.output(h).astype(ms.float32), h

    @ms.jit
    def _forward_jit(self, h, im_mask, cos, sin, attn_mask, infer_mode):
        return self._forward_body(h, im_mask, cos, sin, attn_mask, infer_mode)

    @ms.jit
    def _prefill_jit(self, h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_only):
        return self._prefill_body(h, im_mask, cos, sin, attn_mask, cap, infer_mode, last_only)

    @ms.jit
    def _decode_jit(self, x, mq, mk, attn_mask, k_caches, v_caches, write_pos, infer_mode):
        return self._decode_body(x, mq, mk, attn_mask, k_caches, v_caches, write_pos, infer_mode)

    # -- host side ----------------------------------------------------------------------------------
    def memory_lean(self) -> bool:
        """Whether prefill (and the vision tower, ixc25_ms.model) run eagerly although use_jit is set: quantised
        storage whose weights dequantised to fp32 would exceed LEAN_DEQUANT_BYTES. Prefill's MatMul path
        dequantises each weight, and a CPU graph keeps every buffer of its memory plan until the process ends:
        at 7B ~0.9 GB per layer (the real-shape run of 2026-12-03 was OOM-killed at 22 GB). Eagerly each buffer
        is freed after its MatMul; at that size the ops are long, so eager costs little time."""
        if self.quantization is None:
            return False
        if self._dequant_bytes is None:  # the keys int8 stores quantised, at their spec shapes, in fp32
            from ..quantize.int8 import is_quantized_key
            from ..weights.spec import expected_parameters
            self._dequant_bytes = 4 * sum(int(np.prod(shape)) for k, shape in expected_parameters(self.cfg).items()
                                          if is_quantized_key(k))
        return self._dequant_bytes > LEAN_DEQUANT_BYTES

    def need_mode(self, infer_mode: str) -> None:
        """Load the write/web LoRAs `infer_mode` needs when this model holds them lazily (quantize.LazyLoras)."""
        if self.lazy_loras is not None and infer_mode != "base":
            self.lazy_loras.ensure(self, infer_mode)

    def embed(self, input_ids) -> Tensor:
        """input_ids (B, L) ints -> embeddings (B, L, H) in the compute dtype."""
        return self.model.tok_embeddings(Tensor(np.asarray(input_ids, dtype=np.int32)))

    def _cast(self, x: Tensor) -> Tensor:
        return x if x.dtype == self.compute_dtype else x.astype(self.compute_dtype)  # no Cast op for nothing

    def im_mask_tensor(self, im_mask, b: int, l: int):
        """(B, L) 0/1 host mask -> (B, L, 1) Tensor in the compute dtype, or None when no position is an image."""
        if im_mask is None:
            return None
        m = np.asarray(im_mask.asnumpy() if hasattr(im_mask, "asnumpy") else im_mask).reshape(b, l)
        if not m.any():
            return None  # no image position: the PLoRA branch adds nothing (official adds *0)
        return Tensor(m.astype(np_dtype(self.compute_dtype))[..., None])

    def rope_tables(self, position_ids: np.ndarray, kv_len: int):
        """RoPE tables for a whole sequence: (B, L, 1, G+2, d) cos and sin (see `qkv_rope_tables`)."""
        self.rope.ensure(kv_len)
        cos, sin = qkv_rope_tables(*self.rope.cos_sin(position_ids), self.cfg.num_kv_groups, self.q_scale)
        return Tensor(cos), Tensor(sin)

    def sequence_inputs(self, b: int, l: int, im_mask=None, attention_mask=None, rope_len=None):
        """Host-side inputs of a whole-sequence pass: (im_mask (B,L,1) or None, cos, sin, additive mask, mask).
        rope_len: the sequence length a dynamic-NTK RoPE sees (default L; a bucket-padded batch passes its own)."""
        am = np.ones((b, l), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64).reshape(b, l)
        cos, sin = self.rope_tables(position_ids_from_mask(am), l if rope_len is None else rope_len)
        return self.im_mask_tensor(im_mask, b, l), cos, sin, Tensor(prefill_mask(am)), am

    def construct(self, inputs_embeds, im_mask=None, attention_mask=None, infer_mode="base"):
        """Uncached forward over the whole sequence: logits fp32 (B, L, V)."""
        return self.forward_hidden(inputs_embeds, im_mask, attention_mask, infer_mode)[0]

    def forward_hidden(self, inputs_embeds, im_mask=None, attention_mask=None, infer_mode="base"):
        """Uncached forward: (logits fp32 (B, L, V), final normed hidden (B, L, H))."""
        b, l = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
        self.need_mode(infer_mode)
        m, cos, sin, mask, _ = self.sequence_inputs(b, l, im_mask, attention_mask)
        run = self._forward_jit if self.use_jit else self._forward_body
        return run(self._cast(inputs_embeds), m, cos, sin, mask, infer_mode)

    def prefill(self, inputs_embeds: Tensor, im_mask=None, attention_mask=None, infer_mode: str = "base",
                cap: Optional[int] = None, last_only: bool = True):
        """Runs the prompt into a fresh KV cache of `cap` slots (default L). attention_mask (B, L) 0/1, left
        padding allowed. Returns (logits fp32 (B, 1|L, V), hidden, KVCache)."""
        b, l = int(inputs_embeds.shape[0]), int(inputs_embeds.shape[1])
        cap = l if cap is None else int(cap)
        if cap < l:
            raise ValueError(f"cache capacity {cap} is smaller than the prompt length {l}")
        self.need_mode(infer_mode)
        m, cos, sin, mask, am = self.sequence_inputs(b, l, im_mask, attention_mask)
        run = self._prefill_jit if self.use_jit and not self.memory_lean() else self._prefill_body
        logits, h, ks, vs = run(self._cast(inputs_embeds), m, cos, sin, mask, cap, infer_mode, last_only)
        return logits, h, KVCache.from_prefill(ks, vs, am)

    def decode(self, inputs, cache: KVCache, infer_mode: str = "base"):
        """One cached step for (B,1,H) embeddings — or (B,1) token ids, embedded inside the step — appended to
        `cache` at its next slot (written in place; the cache advances). Generated tokens carry no image mask.
        Returns (logits (B,1,V), hidden (B,1,H))."""
        cfg = self.cfg
        if not isinstance(cache, KVCache):
            raise TypeError(f"decode takes a KVCache (from prefill or KVCache.from_arrays), got {type(cache).__name__}")
        cache.check(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.compute_dtype)
        self.need_mode(infer_mode)
        slot, pos = cache.begin_step()
        self.rope.ensure(slot + 1)
        mq, mk = decode_rope_matrices(*self.rope.cos_sin(pos.reshape(-1, 1)), self.q_scale)
        ks, vs = cache.keys, cache.values
        if self.use_jit:  # a plain tuple of graph outputs would be re-specialised (recompiled) every call
            ks, vs = ms.mutable(ks), ms.mutable(vs)
        if isinstance(inputs, Tensor):
            x = self._cast(inputs)
        else:  # token ids (B, 1): embedded inside the step (no separate eager lookup)
            x = Tensor(np.asarray(inputs, np.int32).reshape(-1, 1))
        run = self._decode_jit if self.use_jit else self._decode_body
        logits, h = run(x, Tensor(mq), Tensor(mk), Tensor(decode_mask(cache.key_valid)), ks, vs,
                        Tensor(np.array([slot], np.int32)), infer_mode)
        cache.end_step()
        return logits, h

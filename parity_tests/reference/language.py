"""Our own plain-PyTorch InternLM2 + partial LoRA, written from the spec (docs §5–§6), for parity tests."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


class Rope:
    """Plain / linear / dynamic-NTK RoPE with sticky dynamic state (spec §5), torch fp32 arithmetic."""

    def __init__(self, dim, base, max_pos, scaling=None):
        self.dim, self.base, self.max_pos = dim, float(base), max_pos
        self.kind = scaling["type"] if scaling else None
        self.factor = float(scaling["factor"]) if scaling else 1.0
        self.build(max_pos)

    def build(self, seq_len):
        self.cached = seq_len
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_pos:
            base = base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))

    def __call__(self, pos: torch.Tensor, seq_len: int):
        if seq_len > self.cached:
            self.build(seq_len)
        t = pos.float()
        if self.kind == "linear":
            t = t / self.factor
        f = t[..., None] * self.inv_freq
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()


def rot_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


class RefLM:
    """Functional model over a dict of torch tensors with official key names."""

    def __init__(self, cfg, state: Dict[str, np.ndarray], dtype=torch.float32):
        self.cfg = cfg
        self.dtype = dtype
        self.w = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in state.items()
                  if k.startswith("model.") or k.startswith("output.")}
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)

    def modal_linear(self, name, x, mode):
        """The PLoRA module without its image LoRA: base linear (+bias) and the write/web LoRAs of `mode`."""
        w = self.w
        y = x @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        if mode == "web":
            y = y + (x @ w[name + ".lora_web_A.weight"].T) @ w[name + ".lora_web_B.weight"].T
        elif mode == "write":
            y = y + (x @ w[name + ".lora_sft_A.weight"].T) @ w[name + ".lora_sft_B.weight"].T
            y = y + (x @ w[name + ".lora_dpo_A.weight"].T) @ w[name + ".lora_dpo_B.weight"].T
        return y

    def image_lora(self, name, x):
        """Plora_B(Plora_A(x)), without the scaling."""
        return (x @ self.w[name + ".Plora_A.weight"].T) @ self.w[name + ".Plora_B.weight"].T

    def plora(self, name, x, im_mask, mode):
        y = self.modal_linear(name, x, mode)
        if im_mask is not None and bool(im_mask.any()):
            y = y + self.image_lora(name, x) * self.cfg.lora_scaling * im_mask[..., None].to(y.dtype)
        return y

    def attention(self, i, x, im_mask, cos, sin, mask, past, mode):
        c = self.cfg
        b, l, _ = x.shape
        G, kvh, d = c.num_kv_groups, c.num_key_value_heads, c.head_dim
        qkv = self.plora(f"model.layers.{i}.attention.wqkv", x, im_mask, mode).view(b, l, kvh, G + 2, d)
        q = qkv[..., :G, :].reshape(b, l, c.num_attention_heads, d).transpose(1, 2)
        k = qkv[..., G, :].transpose(1, 2)
        v = qkv[..., G + 1, :].transpose(1, 2)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q = q * cos + rot_half(q) * sin
        k = k * cos + rot_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], 2)
            v = torch.cat([past[1], v], 2)
        new_past = (k, v)
        k = k.repeat_interleave(G, 1)  # kv head g serves q heads g*G..g*G+G-1
        v = v.repeat_interleave(G, 1)
        s = (q @ k.transpose(2, 3)) / math.sqrt(d)
        s = s.float() + mask
        p = torch.softmax(s, -1).to(v.dtype)
        o = (p @ v).transpose(1, 2).reshape(b, l, -1)
        return self.plora(f"model.layers.{i}.attention.wo", o, im_mask, mode), new_past

    def layer(self, i, h, im_mask, cos, sin, mask, past, mode):
        w, eps = self.w, self.cfg.rms_norm_eps
        a, new_past = self.attention(i, rms_norm(h, w[f"model.layers.{i}.attention_norm.weight"], eps),
                                     im_mask, cos, sin, mask, past, mode)
        h = h + a
        x = rms_norm(h, w[f"model.layers.{i}.ffn_norm.weight"], eps)
        p = f"model.layers.{i}.feed_forward."
        g = F.silu(self.plora(p + "w1", x, im_mask, mode)) * self.plora(p + "w3", x, im_mask, mode)
        return h + self.plora(p + "w2", g, im_mask, mode), new_past

    def embed(self, ids):
        return self.w["model.tok_embeddings.weight"][torch.as_tensor(ids)]

    @torch.inference_mode()
    def forward(self, embeds, im_mask=None, attention_mask=None, mode="base", past=None, position_ids=None):
        """Returns (logits fp32, final hidden, new past list). attention_mask (B, past+L) 0/1."""
        return self.run(embeds, im_mask, attention_mask, mode, past, position_ids)

    def run(self, embeds, im_mask=None, attention_mask=None, mode="base", past=None, position_ids=None,
            head=True):
        """`forward` without inference mode (autograd-capable); head=False skips the logits (None)."""
        embeds = embeds.to(self.dtype)
        b, l, _ = embeds.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        total = past_len + l
        am = torch.ones(b, total, dtype=torch.long) if attention_mask is None else torch.as_tensor(attention_mask)
        if position_ids is None:
            position_ids = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)[:, past_len:]
        cos, sin = self.rope(position_ids, total)
        causal = torch.ones(l, total, dtype=torch.bool).tril(past_len)
        allowed = causal[None] & (am[:, None, :] > 0)
        mask = torch.zeros(b, 1, l, total).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        h = embeds
        new = []
        for i in range(self.cfg.num_hidden_layers):
            h, kv = self.layer(i, h, im_mask, cos, sin, mask, None if past is None else past[i], mode)
            new.append(kv)
        h = rms_norm(h, self.w["model.norm.weight"], self.cfg.rms_norm_eps)
        logits = (h @ self.w["output.weight"].T).float() if head else None
        return logits, h, new

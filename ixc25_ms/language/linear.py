"""The LLM's linears under checkpoint names: one base-weight class, partial LoRA, the write/web LoRAs, PEFT LoRA."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

INFER_MODES = ("base", "write", "web")


def full_mul(x, y):
    """x * y with y broadcast to x's shape first. In a compiled CPU graph (MindSpore 2.10) a broadcasting
    Mul/Add keeps about 4 output-sized buffers for the whole call (prefill peak RSS grew ~0.45 GB per layer at
    1,280 tokens) and is slower than BroadcastTo + a same-shape Mul (notes/performance.md, 2026-11-23)."""
    return x * ops.broadcast_to(y, x.shape)


class BaseLinear(nn.Cell):
    """Owns a linear's base weight `weight` (out, in) and `bias` under the checkpoint's names, and computes
    x W^T (+ b) in `base`. It is the one seam for how base weights are stored and multiplied: partial LoRA and
    LoRA add to `base(x)`; a quantised storage (`ixc25_ms.quantize.prepare`) replaces `weight` by int8 codes
    plus `weight_scale` (out,) (or by fp16) and sets `weight_matmul`, the cell that multiplies that form."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype  # of activations and outputs (the weight's own dtype unless quantised)
        self.weight = Parameter(initializer("zeros", (out_features, in_features), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), dtype), name="bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()  # not `y + bias`: see full_mul
        self.weight_scale = None   # int8 storage: per-output-channel scales (out,) fp32
        self.weight_matmul = None  # quantised storage: (x2d, weight, weight_scale) -> x2d W^T

    def base(self, x):
        """x (..., in) -> (..., out)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.weight_matmul is None:
            y = self.matmul(x2, self.weight)
        else:
            y = self.weight_matmul(x2, self.weight, self.weight_scale)
        if self.bias is not None:
            y = self.bias_add(y, self.bias)
        return y.reshape(shape[:-1] + (self.out_features,))


class Linear(BaseLinear):
    """y = x W^T (+ b); parameters `weight` (out, in) and `bias` as in torch.nn.Linear; `add_lora` gives it PEFT's
    LoRA branch (used for the ViT's backbone LoRA)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=ms.float32):
        super().__init__(in_features, out_features, bias, dtype)
        self.lora_A = self.lora_B = None
        self.peft_scaling, self.peft_dropout = 1.0, 0.0

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, seed: int = 0):
        add_lora_branch(self, r, alpha, dropout, seed)

    def construct(self, x):
        y = self.base(x)
        if self.lora_A is not None:
            y = y + self.lora_B(self.lora_A(_dropout(x, self.peft_dropout, self.training))) * self.peft_scaling
        return y


def _dropout(x, p: float, training: bool):
    return ops.dropout(x, p=p) if training and p > 0 else x


class PLoRA(BaseLinear):
    """Partial LoRA linear (official `PLoRA(nn.Linear)`), plus an optional PEFT LoRA.

    res = x W^T (+b); 'web' adds lora_web on all tokens, 'write' adds lora_sft + lora_dpo on all tokens;
    then Plora_B(Plora_A(dropout(x))) * scaling where im_mask is 1 — a dense masked add, no boolean indexing
    (dropout `plora_dropout`, active in training only: official 0.05); then, when `add_lora` was called, PEFT's
    lora_B(lora_A(dropout(x))) * alpha/r on every token (PEFT wraps the PLoRA, so it adds last).
    """

    def __init__(self, in_features, out_features, bias=False, lora_r=256, lora_scaling=1.0, web_r=512,
                 dtype=ms.float32, plora_dropout: float = 0.0):
        super().__init__(in_features, out_features, bias, dtype)
        self.lora_scaling = float(lora_scaling)
        self.plora_dropout = float(plora_dropout)
        self.Plora_A = Linear(in_features, lora_r, dtype=dtype)
        self.Plora_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_sft_A = Linear(in_features, lora_r, dtype=dtype)
        self.lora_sft_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_dpo_A = Linear(in_features, lora_r, dtype=dtype)
        self.lora_dpo_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_web_A = Linear(in_features, web_r, dtype=dtype)
        self.lora_web_B = Linear(web_r, out_features, dtype=dtype)
        self.lora_A = self.lora_B = None  # PEFT LoRA (add_lora)
        self.peft_scaling, self.peft_dropout = 1.0, 0.0

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, seed: int = 0):
        """Adds PEFT's LoRA branch under PEFT's names (`lora_A.weight` (r, in), `lora_B.weight` (out, r)):
        A kaiming-uniform (a=sqrt(5), as torch.nn.Linear and PEFT), B zero, scaling alpha / r."""
        add_lora_branch(self, r, alpha, dropout, seed)

    def construct(self, x, im_mask=None, infer_mode="base"):
        """x (B, L, in); im_mask (B, L, 1) in x's dtype (0/1) or None when no position is an image token."""
        res = self.base(x)
        if infer_mode == "web":
            res = res + self.lora_web_B(self.lora_web_A(x))
        elif infer_mode == "write":
            res = res + self.lora_sft_B(self.lora_sft_A(x)) + self.lora_dpo_B(self.lora_dpo_A(x))
        if im_mask is not None:  # the 0/1 mask on the rank-r activations, r << out: B(A(x)*m) == B(A(x))*m
            xa = _dropout(x, self.plora_dropout, self.training)
            part = self.Plora_B(full_mul(self.Plora_A(xa), im_mask))
            if self.lora_scaling != 1.0:
                part = part * self.lora_scaling
            res = res + part
        if self.lora_A is not None:
            res = res + self.lora_B(self.lora_A(_dropout(x, self.peft_dropout, self.training))) * self.peft_scaling
        return res


def add_lora_branch(cell, r: int, alpha: float, dropout: float, seed: int = 0):
    """Gives `cell` (with in_features/out_features) PEFT LoRA children `lora_A`/`lora_B` in its weight dtype,
    `peft_scaling` = alpha / r and `peft_dropout`; A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    B = 0, so the branch adds nothing until trained."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    dtype = cell.compute_dtype  # the weight's dtype unless the weight is stored quantised
    a = Linear(cell.in_features, r, dtype=dtype)
    bound = 1.0 / math.sqrt(cell.in_features)
    rng = np.random.default_rng(seed)
    a.weight.set_data(Tensor(rng.uniform(-bound, bound, (r, cell.in_features)).astype(np.float32)).astype(dtype))
    cell.lora_A = a
    cell.lora_B = Linear(r, cell.out_features, dtype=dtype)
    cell.peft_scaling = float(alpha) / float(r)
    cell.peft_dropout = float(dropout)

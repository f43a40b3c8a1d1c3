"""Linear layers named as the checkpoint, and partial LoRA (image tokens only) plus the write/web LoRAs."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

INFER_MODES = ("base", "write", "web")


def full_mul(x, y):
    """x * y with y broadcast to x's shape first. In a compiled CPU graph (MindSpore 2.10) a broadcasting
    Mul/Add keeps about 4 output-sized buffers for the whole call (prefill peak RSS grew ~0.45 GB per layer at
    1,280 tokens) and is slower than BroadcastTo + a same-shape Mul (notes/performance.md, session 7)."""
    return x * ops.broadcast_to(y, x.shape)


class Linear(nn.Cell):
    """y = x W^T (+ b); parameters `weight` (out, in) and `bias` as in torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(initializer("zeros", (out_features, in_features), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), dtype), name="bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()  # not `y + bias`: see full_mul

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.bias is not None:
            y = self.bias_add(y, self.bias)
        return y.reshape(shape[:-1] + (self.out_features,))


class PLoRA(Linear):
    """Partial LoRA linear (official `PLoRA(nn.Linear)`).

    res = x W^T (+b); 'web' adds lora_web on all tokens, 'write' adds lora_sft + lora_dpo on all tokens;
    then Plora_B(Plora_A(x)) * scaling is added where im_mask is 1 — a dense masked add, no boolean indexing.
    """

    def __init__(self, in_features, out_features, bias=False, lora_r=256, lora_scaling=1.0, web_r=512,
                 dtype=ms.float32):
        super().__init__(in_features, out_features, bias, dtype)
        self.lora_scaling = float(lora_scaling)
        self.Plora_A = Linear(in_features, lora_r, dtype=dtype)
        self.Plora_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_sft_A = Linear(in_features, lora_r, dtype=dtype)
        self.lora_sft_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_dpo_A = Linear(in_features, lora_r, dtype=dtype)
        self.lora_dpo_B = Linear(lora_r, out_features, dtype=dtype)
        self.lora_web_A = Linear(in_features, web_r, dtype=dtype)
        self.lora_web_B = Linear(web_r, out_features, dtype=dtype)

    def construct(self, x, im_mask=None, infer_mode="base"):
        """x (B, L, in); im_mask (B, L, 1) in x's dtype (0/1) or None when no position is an image token."""
        res = super().construct(x)
        if infer_mode == "web":
            res = res + self.lora_web_B(self.lora_web_A(x))
        elif infer_mode == "write":
            res = res + self.lora_sft_B(self.lora_sft_A(x)) + self.lora_dpo_B(self.lora_dpo_A(x))
        if im_mask is not None:  # the 0/1 mask on the rank-r activations, r << out: B(A(x)*m) == B(A(x))*m
            part = self.Plora_B(full_mul(self.Plora_A(x), im_mask))
            if self.lora_scaling != 1.0:
                part = part * self.lora_scaling
            res = res + part
        return res

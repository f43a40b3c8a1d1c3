"""MindSpore building blocks shared by the vision towers (LayerNorm, patch conv, dense, attention, tower base)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from ..dtypes import ms_dtype


def param(shape, dtype, init="zeros") -> Parameter:
    return Parameter(initializer(init, shape, dtype))


def dense(n_in: int, n_out: int, dtype):
    """A linear with bias under torch's names `weight` [out, in] / `bias`, zero-initialised (weights come from a
    checkpoint): the LLM's `Linear`, so a backbone LoRA plugs into the ViT the same way (`add_lora`)."""
    from ..language.linear import Linear
    return Linear(n_in, n_out, bias=True, dtype=ms_dtype(dtype))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with torch names `weight`/`bias`; computed in fp32, returned in x's dtype."""

    def __init__(self, n: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.weight = param((n,), dtype, "ones")
        self.bias = param((n,), dtype, "zeros")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32),
                            ops.cast(self.bias, ms.float32))
        return ops.cast(y, x.dtype)


class PatchConv(nn.Cell):
    """Conv2d(3, C, k=s=patch) with its `weight` (C, 3, p, p) (and `bias` only if asked), computed as what a
    stride-p p x p convolution is: the image cut into p x p patches, each flattened (c, i, j) and multiplied by
    the flattened weight. MindSpore 2.10's CPU conv2d took 8-13 s for the 3 views of a 700x300 picture at
    ViT-L width; the patch matmul takes ~0.07 s (same values up to summation order; notes/performance.md)."""

    def __init__(self, channels: int, hidden: int, patch: int, dtype, bias: bool = False):
        super().__init__()
        self.patch = patch
        self.has_bias = bias
        self.weight = param((hidden, channels, patch, patch), dtype)
        if bias:
            self.bias = param((hidden,), dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        b, c, hh, ww = x.shape
        p = self.patch
        gh, gw = hh // p, ww // p
        patches = ops.reshape(ops.transpose(ops.reshape(x, (b, c, gh, p, gw, p)), (0, 2, 4, 1, 3, 5)),
                              (b * gh * gw, c * p * p))  # (B*grid*grid, 3*p*p), (c, i, j) as the weight
        w = ops.reshape(self.weight, (self.weight.shape[0], -1))
        y = self.matmul(patches, ops.cast(w, patches.dtype))  # (B*grid*grid, C)
        if self.has_bias:
            y = ops.bias_add(y, ops.cast(self.bias, y.dtype))
        return ops.transpose(ops.reshape(y, (b, gh, gw, -1)), (0, 3, 1, 2))  # (B, C, grid, grid)


class Table(nn.Cell):
    """A learned table held as `weight` (position embeddings)."""

    def __init__(self, rows: int, dim: int, dtype):
        super().__init__()
        self.weight = param((rows, dim), dtype)

    def construct(self):
        return self.weight


def _heads(x, b, n, heads, d):
    return ops.transpose(ops.reshape(x, (b, n, heads, d)), (0, 2, 1, 3))


def attend(q, k, v, heads: int, fused=None):
    """(B,N,C) q (already scaled), k, v -> (B,N,C) multi-head attention; scores and softmax in fp32.
    fused: the fused CPU attention op (ixc25_ms.fused_attention), no score tensor in the graph."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = _heads(q, b, n, heads, d), _heads(k, b, n, heads, d), _heads(v, b, n, heads, d)
    if fused is not None:
        out = fused(q, k, v, ops.zeros((1, 1, 1, 1), q.dtype))[0]  # (1,1,1,1): no mask
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, n, c))
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
    probs = ops.cast(ops.softmax(ops.cast(scores, ms.float32), -1), v.dtype)
    out = ops.matmul(probs, v)
    return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, n, c))


class TowerCell(nn.Cell):
    """Base of every tower cell: (B,3,R,R) pixels -> (B, grid*grid, C) patch features in `compute_dtype`.

    Holds the vision config `cfg`, `geometry` (resolution, patch, grid), `resolution` (the HD crop side),
    `hidden_size` (C; the projector sees 4C after the 2x2 merge). Subclasses define `construct`;
    `forward_jit` is its graph-compiled twin (one compile per batch size)."""

    def __init__(self, vision_cfg, geometry, dtype):
        super().__init__()
        self.cfg = vision_cfg
        self.geometry = geometry
        self.resolution = geometry.resolution
        self.patch_size = geometry.patch
        self.grid = geometry.grid
        self.compute_dtype = ms_dtype(dtype)
        self.hidden_size = vision_cfg.hidden_size

    @ms.jit
    def forward_jit(self, pixel_values):
        """Graph-mode forward, same result as construct."""
        return self.construct(pixel_values)

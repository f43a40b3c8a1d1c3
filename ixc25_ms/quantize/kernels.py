"""x @ W^T from a quantised weight, per device: CPU Custom ops, Ascend's WeightQuantBatchMatmul, portable ops.

`Int8Matmul` (int8 weight (N, K) + fp32 scale per output row) and `F16Matmul` (fp16 weight) are the cells a
`BaseLinear` calls from `base()` when its weight is stored quantised (`ixc25_ms.quantize.prepare`):
- CPU, fp32 activations, kernel library built (cpu_kernels, switch IXC25_CPU_KERNELS): up to GEMV_MAX_ROWS rows
  (decode: one token per row) the fused mat-vec of csrc/quant_kernels.cc reads the 1-byte (or 2-byte) weights
  and dequantises in registers; more rows (prefill) dequantise the weight to fp32 in one pass (a Custom op)
  and run MindSpore's fp32 MatMul, so prefill stays compute-efficient.
- Ascend with fp16/bf16 activations (int8 only): `WeightQuantBatchMatmul` (aclnnWeightQuantBatchMatmulV2,
  undocumented in MindSpore 2.10; see notes/ascend.md), weight transposed, antiquant scale per channel.
- elsewhere: Cast the weight to the activation dtype, MatMul, and the scale on the output (portable ops).
"""
from __future__ import annotations

import threading
from typing import Dict, Optional

import mindspore as ms
from mindspore import nn, ops

GEMV_MAX_ROWS = 8  # rows of x up to which the CPU mat-vec kernels run (decode, batch <= 8)
_lock = threading.Lock()
_kernels: Dict[str, "QuantKernels"] = {}


class QuantKernels:
    """The Custom ops of csrc/quant_kernels.cc (one Primitive each, shared by every linear of a model)."""

    def __init__(self, path: str):
        def op(name, shape, dtype):
            return ops.Custom(f"{path}:{name}", out_shape=shape, out_dtype=dtype, func_type="aot")

        self.int8_linear = op("IxcInt8Linear", lambda x, w, s: [x[0], w[0]], lambda x, w, s: x)  # (M,K)->(M,N)
        self.f16_linear = op("IxcF16Linear", lambda x, w: [x[0], w[0]], lambda x, w: x)
        self.int8_dequant = op("IxcInt8Dequant", lambda w, s: w, lambda w, s: s)  # (N,K) int8 -> fp32
        # the same on weights in the packed decode layout (quantize.int8.pack_rows)
        self.int8_linear_packed = op("IxcInt8LinearPacked", lambda x, w, s: [x[0], w[0]], lambda x, w, s: x)
        self.int8_dequant_packed = op("IxcInt8DequantPacked", lambda w, s: w, lambda w, s: s)


def cpu_quant_kernels(dtype, requested=None) -> Optional[QuantKernels]:
    """The CPU quantised-linear ops where they can run (CPU, fp32 compute, library built; IXC25_CPU_KERNELS
    as for the fused decode kernels), else None (the portable ops)."""
    from ..cpu_kernels import library_path, switch
    if not switch(dtype, requested):
        return None
    path = library_path()
    with _lock:
        if path not in _kernels:
            _kernels[path] = QuantKernels(path)
        return _kernels[path]


def _weight_quant_batch_matmul():
    """MindSpore's WeightQuantBatchMatmul primitive (x @ ((w + offset) * scale)), weight given (N, K)."""
    from mindspore.ops.auto_generate import WeightQuantBatchMatmul
    return WeightQuantBatchMatmul(transpose_x=False, transpose_weight=True, antiquant_group_size=0)


def ascend_weight_quant(dtype) -> bool:
    """Whether int8 linears use WeightQuantBatchMatmul: device target Ascend and fp16/bf16 compute (its x)."""
    return ms.get_context("device_target") == "Ascend" and dtype in (ms.float16, ms.bfloat16)


class Int8Matmul(nn.Cell):
    """(x (M, K), w int8 (N, K), scale fp32 (N,)) -> x @ (w * scale)^T (M, N) in x's dtype.

    packed=True (CPU kernels only): w is in the mat-vec's packed layout (quantize.int8.pack_rows), which the
    loader writes for such cells: one sequential stream per 8 rows, ~2x the mat-vec speed of row-major."""

    def __init__(self, kernels: Optional[QuantKernels] = None, ascend: bool = False, packed: bool = False):
        super().__init__()
        if packed and kernels is None:
            raise ValueError("Int8Matmul: the packed layout needs the CPU kernels")
        self.kernels, self.packed = kernels, packed
        self.matmul = ops.MatMul(transpose_b=True)
        self.wqbmm = _weight_quant_batch_matmul() if ascend else None

    def construct(self, x, w, scale):
        if self.kernels is not None:
            if self.packed:
                if x.shape[0] <= GEMV_MAX_ROWS:
                    return self.kernels.int8_linear_packed(x, w, scale)
                return self.matmul(x, self.kernels.int8_dequant_packed(w, scale))
            if x.shape[0] <= GEMV_MAX_ROWS:
                return self.kernels.int8_linear(x, w, scale)
            return self.matmul(x, self.kernels.int8_dequant(w, scale))
        if self.wqbmm is not None:
            return self.wqbmm(x, w, scale.astype(x.dtype))
        y = self.matmul(x, w.astype(x.dtype))
        return y * ops.broadcast_to(scale.astype(y.dtype), y.shape)  # same-shape Mul: see linear.full_mul


class F16Matmul(nn.Cell):
    """(x (M, K), w fp16 (N, K), unused) -> x @ w^T (M, N) in x's dtype (fp16 storage, compute in x's dtype)."""

    def __init__(self, kernels: Optional[QuantKernels] = None):
        super().__init__()
        self.kernels = kernels
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, w, scale=None):
        if self.kernels is not None and x.shape[0] <= GEMV_MAX_ROWS:
            return self.kernels.f16_linear(x, w)
        return self.matmul(x, w.astype(x.dtype))

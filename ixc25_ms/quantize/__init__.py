"""Weight-only quantisation of the LLM: int8 per output channel (or fp16), quantised storage, kernels, loading.

Public names: `quantize_int8` / `dequantize_int8` (numpy), `prepare` (swap a model's storage before loading),
`load_weights` (fill a model from a checkpoint, quantising while streaming or reading pre-quantised int8),
`LazyLoras` (write/web LoRAs on demand), `Int8Matmul` / `F16Matmul` (the cells `BaseLinear.base` calls),
QUANT_MODES, SCALE_SUFFIX. See notes/quantization.md.
"""
from .int8 import QMAX, dequantize_int8, quantize_int8, relative_error, to_float16
from .kernels import GEMV_MAX_ROWS, F16Matmul, Int8Matmul
from .lazy import LazyLoras
from .load import load_weights, stored_quantization
from .prepare import LAZY_LORAS, QUANT_MODES, SCALE_SUFFIX, base_linears, prepare

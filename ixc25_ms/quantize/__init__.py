"""Weight-only quantisation of the LLM: int8 per output channel (or fp16), quantised storage, kernels, loading.

Public names: `quantize_int8` / `dequantize_int8` / `to_float16` / `pack_rows` (numpy), `prepare` (swap a model's storage
before loading), `load_weights` (fill a model from a checkpoint, quantising while streaming or reading
pre-quantised int8), `LazyLoras` (write/web LoRAs on demand), `Int8Matmul` / `F16Matmul` (the cells
`BaseLinear.base` calls), QUANT_MODES, SCALE_SUFFIX, `is_quantized_key`. See notes/quantization.md.
Importing the package does not import MindSpore (the converter uses `quantize.int8` without it).
"""
_LAZY = {
    "QMAX": "int8", "SCALE_SUFFIX": "int8", "dequantize_int8": "int8", "quantize_int8": "int8",
    "relative_error": "int8", "to_float16": "int8", "is_quantized_key": "int8", "pack_rows": "int8",
    "unpack_rows": "int8", "packable": "int8",
    "GEMV_MAX_ROWS": "kernels", "F16Matmul": "kernels", "Int8Matmul": "kernels",
    "LazyLoras": "lazy", "load_weights": "load", "stored_quantization": "load",
    "LAZY_LORAS": "prepare", "QUANT_MODES": "prepare", "base_linears": "prepare", "prepare": "prepare",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

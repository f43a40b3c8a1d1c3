"""ixc25-parity: the MindSpore port vs our PyTorch reference, module by module (see notes/parity-tool.md)."""
# The MindSpore side runs first, its rows captured with forward hooks on the model's own cells and saved to a
# work directory; the model is freed; then the reference runs and each output is compared with the saved row.
# Importing the package imports neither MindSpore nor torch; the names below load their module on first use.
_LAZY = {
    "run_parity": "run", "main": "cli", "build_parser": "cli",
    "LazyArray": "lazy", "LazyWeights": "lazy", "ActivationStore": "store",
    "CHUNK": "compare", "compare_chunked": "compare", "load_tolerance_table": "compare", "Comparer": "compare",
    "format_table": "report", "summary_line": "report", "to_markdown": "report", "write_reports": "report",
    "input_geometry": "estimate", "estimate_memory": "estimate", "tower_geometry": "estimate",
    "canvas": "inputs", "is_video": "inputs",
    "capture": "hooks", "tower_taps": "hooks", "llm_taps": "hooks", "layer_stack": "hooks",
    "build_ms_model": "ms_side", "run_mindspore": "ms_side", "encode_with_rows": "ms_side",
    "decoder_rows": "ms_side", "run_reference": "torch_side",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

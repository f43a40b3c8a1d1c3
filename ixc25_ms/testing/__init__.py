"""Shared test and benchmark support: synthetic model and inputs, host memory probes, the tiny-model tester."""
# Importing the package does not import MindSpore or torch; the names below load their module on first access.
_LAZY = {
    "DEFAULT_CFG": "synthetic", "QUICK_CFG": "synthetic", "make_image": "synthetic", "synthetic_state": "synthetic",
    "scaled_init": "synthetic", "random_lm_state": "synthetic", "random_state": "synthetic",
    "vm": "memory", "reset_peak": "memory", "peak_rss_mb": "memory", "release_host_memory": "memory",
    "memory_bandwidth": "memory",
    "TINY_CONFIG": "tester", "tiny_config_dict": "tester", "tiny_config": "tester", "build_ms_lm": "tester",
    "TinyModelTester": "tester",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)

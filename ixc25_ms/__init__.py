"""ixc25-ms: InternLM-XComposer-2.5 on MindSpore."""
import os as _os

_os.environ.setdefault("GLOG_v", "3")  # MindSpore logs errors only unless the user says otherwise

from .config import ConfigError, IXCConfig, VisionConfig  # noqa: E402
from .weights import CheckpointError  # noqa: E402

__version__ = "0.1.0"


def load(path, dtype="float32", allow_pickle=False, use_jit=False):
    """Load an official-layout (or converted) checkpoint directory -> (model, tokenizer).

    use_jit compiles the ViT, prefill and decode steps with mindspore.jit (graph mode)."""
    from .model import load as _load
    return _load(path, dtype=dtype, allow_pickle=allow_pickle, use_jit=use_jit)


def __getattr__(name):
    if name == "InternLMXComposer2ForCausalLM":
        from .model import InternLMXComposer2ForCausalLM
        return InternLMXComposer2ForCausalLM
    if name == "InternLM2Tokenizer":
        from .tokenizer import InternLM2Tokenizer
        return InternLM2Tokenizer
    raise AttributeError(name)

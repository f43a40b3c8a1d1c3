"""ixc25-ms: InternLM-XComposer-2.5 on MindSpore."""
import os as _os

_os.environ.setdefault("GLOG_v", "3")  # MindSpore logs errors only unless the user says otherwise

from .config import ConfigError, IXCConfig, VisionConfig  # noqa: E402
from .weights import CheckpointError  # noqa: E402

__version__ = "0.1.0"
LOAD_ERRORS = (CheckpointError, ConfigError, OSError)  # what `load` raises on a directory it cannot read: one line each
# the embedded default model: a tiny IXC2.5 trained by ixc25-finetune on drawn shapes (scripts/train_default.py)
DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "default_model")


def load(path, dtype="float32", allow_pickle=False, use_jit=False, adapter=None, quantize=None, lazy_loras=True):
    """Load an official-layout (or converted) checkpoint directory -> (model, tokenizer).

    use_jit compiles the ViT, prefill and decode steps with mindspore.jit (graph mode). adapter: a PEFT LoRA
    adapter directory (ours from ixc25-finetune --use_lora, or one the official scripts saved) applied on top:
    its LoRA acts on every token, after the partial LoRA. quantize: "int8" (weight-only, one scale per output
    channel, for the LLM's base linears and output head; quantised while streaming), "fp16", or None (as
    stored: float, or int8 for a checkpoint ixc25-convert --quantize int8 wrote). lazy_loras (default
    True): the write/web LoRAs are read from the checkpoint when infer_mode first asks for them; False keeps
    every tensor in memory (the trainer's choice: it saves them back).
    See notes/quantization.md."""
    from .model import load as _load
    model, tok = _load(path, dtype=dtype, allow_pickle=allow_pickle, use_jit=use_jit, quantize=quantize,
                       lazy_loras=lazy_loras)
    if adapter is not None:
        from .train.lora import apply_adapter
        apply_adapter(model, adapter, allow_pickle)
    return model, tok


def __getattr__(name):
    if name == "InternLMXComposer2ForCausalLM":
        from .model import InternLMXComposer2ForCausalLM
        return InternLMXComposer2ForCausalLM
    if name == "InternLM2Tokenizer":
        from .tokenizer import InternLM2Tokenizer
        return InternLM2Tokenizer
    raise AttributeError(name)

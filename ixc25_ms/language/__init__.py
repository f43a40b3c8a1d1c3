"""InternLM2 with partial LoRA on MindSpore: RoPE, linears, layers, the KV cache and the causal LM."""
from .cache import KVCache, decode_mask, position_ids_from_mask, prefill_mask
from .layers import Attention, DecoderLayer, Embedding, FeedForward, RMSNorm
from .linear import INFER_MODES, BaseLinear, Linear, PLoRA, full_mul
from .model import (PREFILL_CHUNK, PREFILL_MAX_CHUNKS, InternLM2ForCausalLM, InternLM2Model, flash_attention_switch,
                    prefill_chunk_rows)
from .rope import RotaryTable, decode_rope_matrices, qkv_rope_tables, rotate_half_matrix

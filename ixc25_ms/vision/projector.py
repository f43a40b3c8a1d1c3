"""The IXC2.5 'mlp2x_gelu' projector from the 4C merged-token space to the LLM hidden size."""
from __future__ import annotations

from mindspore import nn

from ..dtypes import ms_dtype
from .cells import dense


def build_vision_proj(in_dim: int, out_dim: int, dtype="float32") -> nn.SequentialCell:
    """Dense(in,out) -> exact GELU -> Dense(out,out); params 0.* and 2.* (in_dim = 4 x the tower's hidden size)."""
    dtype = ms_dtype(dtype)
    return nn.SequentialCell([dense(in_dim, out_dim, dtype), nn.GELU(approximate=False),
                              dense(out_dim, out_dim, dtype)])

"""Weight-only int8 on the host: symmetric per-output-channel quantisation of (out, in) weights, and back."""
from __future__ import annotations

import re
from typing import Tuple

import numpy as np

from ..weights.tags import widen

QMAX = 127           # symmetric: codes in [-127, 127] (-128 unused, so -q is always a code)
ROW_BLOCK = 1024     # rows per step: bounds the fp32 temporaries of a quantisation (1024 x 14,336 x 4 B = 59 MB)
CHUNK = 1 << 24      # elements per step of a float16 narrowing
SCALE_SUFFIX = "_scale"  # `<linear>.weight` int8 -> `<linear>.weight_scale` fp32 (out,)
# the checkpoint keys of the base weights int8 stores as codes + scales (decoder linears, output head)
QUANTIZED_KEY = re.compile(r"model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])\.weight|output\.weight")


def is_quantized_key(key: str) -> bool:
    """Whether `key` is a base weight that int8 stores as codes + `weight_scale` (decoder linears, output head)."""
    return QUANTIZED_KEY.fullmatch(key) is not None


def quantize_int8(w: np.ndarray, tag: str = "F32") -> Tuple[np.ndarray, np.ndarray]:
    """(out, in) float weights (stored array under safetensors tag `tag`; bf16 as uint16 bits) ->
    (q int8 (out, in), scale float32 (out,)) with w ~= q * scale[:, None]: scale = max|row| / 127,
    q = round-half-even(w / scale). A zero row gets scale 0 and codes 0. In ROW_BLOCK steps, so the float32
    copy of a big bf16 weight never exists whole."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantisation takes (out, in) weights, got shape {list(w.shape)}")
    out, _ = w.shape
    q = np.empty(w.shape, np.int8)
    scale = np.empty(out, np.float32)
    for r in range(0, out, ROW_BLOCK):
        block = widen(w[r:r + ROW_BLOCK], tag, np.float32)
        if not np.isfinite(block).all():
            bad = r + int(np.argwhere(~np.isfinite(block))[0][0])
            raise ValueError(f"row {bad} holds a non-finite value; int8 quantisation needs finite weights")
        amax = np.abs(block).max(axis=1)
        s = (amax / QMAX).astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        codes = np.rint(block * inv[:, None])
        np.clip(codes, -QMAX, QMAX, out=codes)
        q[r:r + ROW_BLOCK] = codes
        scale[r:r + ROW_BLOCK] = s
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(out, in) int8 codes and (out,) scales -> float32 weights q * scale[:, None]."""
    if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"dequantize_int8 takes int8 (out, in) codes and (out,) scales, got {q.dtype} "
                         f"{list(q.shape)} and {list(scale.shape)}")
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


PACK_ROWS, PACK_COLS = 8, 16  # the CPU mat-vec's block: 8 rows x 16 columns (csrc/quant_kernels.cc)


def packable(out: int, fin: int) -> bool:
    """Whether an (out, in) int8 weight can take the packed decode layout (every real IXC2.5 shape can)."""
    return out % PACK_ROWS == 0 and fin % PACK_COLS == 0


def pack_rows(q: np.ndarray) -> np.ndarray:
    """(out, in) row-major codes -> the same shape in the CPU mat-vec's layout: blocks of 8 rows, each block
    K/16 chunks of 8 rows x 16 columns, so the kernel reads a block as one sequential stream."""
    n, k = q.shape
    if not packable(n, k):
        raise ValueError(f"pack_rows: shape {[n, k]} is not a multiple of {[PACK_ROWS, PACK_COLS]}")
    return np.ascontiguousarray(q.reshape(n // PACK_ROWS, PACK_ROWS, k // PACK_COLS, PACK_COLS)
                                .transpose(0, 2, 1, 3)).reshape(n, k)


def unpack_rows(p: np.ndarray) -> np.ndarray:
    """The inverse of pack_rows."""
    n, k = p.shape
    return np.ascontiguousarray(p.reshape(n // PACK_ROWS, k // PACK_COLS, PACK_ROWS, PACK_COLS)
                                .transpose(0, 2, 1, 3)).reshape(n, k)


def to_float16(w: np.ndarray, tag: str = "F32") -> Tuple[np.ndarray, int]:
    """A stored float array -> (float16 array, number of values that are not exactly representable), in
    CHUNK-element steps. bf16 values in fp16's normal range [6.1e-5, 65504] are exact (fp16 has more mantissa
    bits); a finite value beyond 65504 would become inf, which is refused."""
    out = np.empty(w.shape, np.float16)
    src, dst = w.reshape(-1), out.reshape(-1)
    inexact = 0
    for i in range(0, src.size, CHUNK):
        x = widen(src[i:i + CHUNK], tag, np.float32)
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        over = np.isinf(h) & np.isfinite(x)
        if over.any():
            raise ValueError(f"value {float(x[over][0]):.6g} is beyond the float16 range")
        inexact += int(np.count_nonzero(h.astype(np.float32) != x))
        dst[i:i + CHUNK] = h
    return out, inexact


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref||_F / ||ref||_F in float64 (0 when both are zero)."""
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    den = float(np.linalg.norm(r64))
    num = float(np.linalg.norm(a64 - r64))
    return num / den if den > 0 else num

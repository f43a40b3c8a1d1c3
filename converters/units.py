"""The converter's vocabulary: tool name and version, its error class, sizes and dtype names."""
from __future__ import annotations

from typing import Optional

from ixc25_ms.weights import CheckpointError

TOOL = "ixc25-convert"
TOOL_VERSION = "0.1.0"
PARAM_TAGS = ("F32", "F16", "BF16")  # dtypes a parameter may have
DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
               "fp32": "F32", "float32": "F32", "float": "F32"}


class ConversionError(CheckpointError):
    """The conversion cannot proceed; the message names the file and key."""


def parse_size(text: str) -> int:
    """'2GB' -> 2e9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = [("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
             ("KB", 10 ** 3), ("MB", 10 ** 6), ("GB", 10 ** 9), ("TB", 10 ** 12), ("K", 10 ** 3),
             ("M", 10 ** 6), ("G", 10 ** 9), ("B", 1)]
    for u, mult in units:
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        val = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (examples: 2GB, 500MB, 1GiB)") from None
    if val <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(val * mult)


def human(n: float) -> str:
    """Bytes as '1.5 GB' (powers of 1000)."""
    for u in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or u == "TB":
            return f"{n:.1f} {u}" if u != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n} B"


def dtype_tag(name: Optional[str]) -> Optional[str]:
    """--dtype name -> safetensors tag (None: keep each tensor's dtype)."""
    if name is None:
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ConversionError(f"unsupported --dtype {name!r} (bf16, fp16 or fp32)") from None

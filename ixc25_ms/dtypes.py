"""The one dtype table: names -> MindSpore compute dtypes and host numpy dtypes, and where each has kernels."""
from __future__ import annotations

import mindspore as ms
import numpy as np

# every accepted spelling -> MindSpore dtype
MS_DTYPES = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16, "fp16": ms.float16,
             "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}
# MindSpore dtype -> numpy dtype of host arrays fed to it (bf16 has no numpy type: fp32 on the host, cast on device)
NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.bfloat16: np.float32}
# device targets whose MindSpore 2.10 kernels cover bf16 matmul/softmax/norms (CPU has none)
BF16_TARGETS = ("Ascend",)


class DtypeError(ValueError):
    """A dtype name is unknown, or the device target has no kernels for it."""


def ms_dtype(dtype, check_device: bool = False):
    """A dtype name ('float32', 'fp16', 'bfloat16', ...) or MindSpore dtype -> the MindSpore dtype.

    With check_device, bf16 is refused where the current device target has no bf16 kernels."""
    if isinstance(dtype, str):
        if dtype not in MS_DTYPES:
            raise DtypeError(f"unsupported dtype {dtype!r}; use one of {sorted(MS_DTYPES)}")
        dtype = MS_DTYPES[dtype]
    elif dtype not in NP_DTYPES:
        raise DtypeError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    if check_device and dtype == ms.bfloat16:
        target = ms.get_context("device_target")
        if target not in BF16_TARGETS:
            raise DtypeError(f"dtype bfloat16 has no {target} kernels in MindSpore {ms.__version__} (matmul, softmax, "
                             f"norms): use dtype='float32' or 'float16' here (bf16 checkpoints are widened exactly)")
    return dtype


def np_dtype(dtype) -> type:
    """numpy dtype of host arrays for a MindSpore compute dtype (float32 for bf16)."""
    return NP_DTYPES[ms_dtype(dtype)]


def dtype_name(dtype) -> str:
    """Canonical name: 'float32', 'float16' or 'bfloat16'."""
    return {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}[ms_dtype(dtype)]

"""Fused CPU attention: csrc/fused_attention.cc as a MindSpore Custom op with its own backward.

MindSpore's compiled CPU training step keeps score-sized buffers of every layer's attention (forward and
backward: ~1.1 GB per layer at 1,408 positions and 16 heads, notes/training.md), and its inference graphs
(the ViT, the prefill) hold them too; this op holds a group's scores in a kernel-private scratch of 512 rows
and recomputes them in the backward (saving only the output and each row's log-sum), so the graph has no
(heads, L, L) tensor at all. Its GEMMs are oneDNN's
`dnnl_sgemm` from the libdnnl that MindSpore ships. Used on CPU in fp32 wherever the decode kernels are
(switch: IXC25_CPU_KERNELS): the decoder layers' uncached forward and prefill, the vision towers' attention,
training included; elsewhere (Ascend, GPU, fp16/bf16) the portable ops run.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Optional

import mindspore as ms
from mindspore import ops
from mindspore.ops import DataType

from .cpu_kernels import KernelBuildError, _cache_dir, build_library, switch

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "fused_attention.cc")
_lock = threading.Lock()
_built: dict = {}
_ops: dict = {}  # library path -> FusedAttention (one pair of Primitives per process)


def _dnnl_link() -> list:
    """Linker arguments for the libdnnl inside the installed MindSpore."""
    libdir = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")
    found = sorted(glob.glob(os.path.join(libdir, "libdnnl.so*")))
    if not found:
        raise KernelBuildError(f"no libdnnl.so in {libdir} (the fused attention kernel links MindSpore's oneDNN)")
    return [f"-L{libdir}", f"-l:{os.path.basename(found[0])}", f"-Wl,-rpath,{libdir}"]


def library_path() -> Optional[str]:
    """The built attention library, or None when it cannot be built (the reason is logged once)."""
    d = _cache_dir()
    with _lock:
        if d not in _built:
            try:
                _built[d] = (build_library(d, sources=[SOURCE], name="ixc25_fused_attention", link=_dnnl_link()), "")
            except (KernelBuildError, OSError) as e:
                _built[d] = (None, str(e))
                log.warning("fused CPU attention unavailable, using the portable ops: %s", e)
        return _built[d][0]


class FusedAttention:
    """(q (B,H,L,D) pre-scaled, k/v (B,KV,C,D), additive mask (B,1,L,C)) -> (out (B,H,L,D), lse (B,H,L): the
    log of each row's softmax sum after its max is subtracted);
    differentiable in q, k, v (the mask gets a zero gradient). fp32, contiguous inputs."""

    def __init__(self, path: str):
        # shapes inferred in C++ (IxcAttn*InferShape): a dynamic-shape graph re-infers them at run time, which the
        # Python out_shape cannot serve (MindSpore 2.10 fails with "The pointer[value] is null")
        bwd = ops.Custom(f"{path}:IxcAttnBwd", out_shape=None, out_dtype=lambda q, k, v, m, o, l, do: (q, q, q),
                         func_type="aot", reg_info=_reg_info("IxcAttnBwd", 7, 3))
        zeros_like = ops.ZerosLike()

        def bprop(q, k, v, mask, out, dout):
            dq, dk, dv = bwd(q, k, v, mask, out[0], out[1], dout[0])
            return dq, dk, dv, zeros_like(mask)

        self.op = ops.Custom(f"{path}:IxcAttnFwd", out_shape=None, out_dtype=lambda q, k, v, m: (q, q),
                             func_type="aot", bprop=bprop, reg_info=_reg_info("IxcAttnFwd", 4, 2))


def _reg_info(name: str, n_in: int, n_out: int):
    """fp32 in, fp32 out, `n_out` outputs: registered so MindSpore treats the op as multi-output."""
    reg = ops.CustomRegOp(name)
    for i in range(n_in):
        reg = reg.input(i, f"x{i}")
    for i in range(n_out):
        reg = reg.output(i, f"y{i}")
    reg = reg.dtype_format(*([DataType.F32_Default] * (n_in + n_out)))
    return reg.target("CPU").get_op_info()


def fused_attention(dtype=ms.float32, requested: Optional[bool] = None) -> Optional[FusedAttention]:
    """The fused attention where it can run (CPU, fp32, kernels switched on, library built), else None."""
    if not switch(dtype, requested):
        return None
    path = library_path()
    if path is None:
        if requested:
            raise KernelBuildError(f"the fused CPU attention was required but could not be built: "
                                   f"{_built[_cache_dir()][1]}")
        return None
    with _lock:
        if path not in _ops:
            _ops[path] = FusedAttention(path)
        return _ops[path]


def use_fused_attention(model, requested: Optional[bool] = None, dtype=None) -> bool:
    """Routes every attention of `model` that has a `fused_attention` slot (the decoder layers' uncached
    attention and prefill, the vision towers' self-attention) through the fused op; where it cannot run (or
    requested is False) they get the portable ops and the result is False."""
    att = fused_attention(model.compute_dtype if dtype is None else dtype, requested)
    for _, cell in model.cells_and_names():
        if hasattr(cell, "fused_attention"):
            cell.fused_attention = None if att is None else att.op
    return att is not None

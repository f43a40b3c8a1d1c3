"""Fused fp32 CPU kernels for the decode step: csrc/decode_kernels.cc built with g++ into MindSpore Custom ops.

On MindSpore's CPU backend a decode step of one token is bound by kernel launches as much as by the weights:
each launch costs tens of microseconds of runtime work. These kernels fuse the small ops around the linears
(RMSNorm with the residual add before it, the q/k/v split with RoPE, SwiGLU), so a layer launches 15
kernels instead of 28. Attention stays MindSpore's two-threaded BatchMatMul/Softmax: fused attention
kernels (one or two threads) were not measurably faster at 1,408 slots (notes/performance.md, 2026-11-23).
They run only where they can: device target CPU, float32, one token per row (decode; in a last-token
prefill also the last layer's SwiGLU, which sees one row); elsewhere (Ascend, GPU, fp16/bf16, the rest of
prefill) the portable MindSpore ops run, and those stay tested.

The same library holds the weight-only quantised linears of csrc/quant_kernels.cc (int8 and fp16 weights,
fp32 activations; used through ixc25_ms/quantize/kernels.py) and the in-place optimizer updates of
csrc/optim_kernels.cc (ixc25_ms/train/optim.py), under the same switch; ixc25_ms/fused_attention.py builds
its own library (it links MindSpore's oneDNN).

Switch: `IXC25_CPU_KERNELS` = `auto` (default: used when the library builds), `0` (never), `1` (required:
an error when it cannot be built). The library is built once per source/compiler/flags into
`$IXC25_KERNEL_CACHE` (default `~/.cache/ixc25_ms`), written under a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import mindspore as ms
from mindspore import ops

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "decode_kernels.cc")
QUANT_SOURCE = os.path.join(os.path.dirname(SOURCE), "quant_kernels.cc")
OPTIM_SOURCE = os.path.join(os.path.dirname(SOURCE), "optim_kernels.cc")  # in-place optimizer updates
CXXFLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-pthread"]
_lock = threading.Lock()
_built: dict = {}  # cache dir -> (path or None, error message)


class KernelBuildError(RuntimeError):
    """The fused CPU kernels were required (IXC25_CPU_KERNELS=1) but could not be built."""


def _cache_dir() -> str:
    return os.environ.get("IXC25_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ixc25_ms")


def build_library(cache_dir: Optional[str] = None, compiler: Optional[str] = None, sources=None,
                  name: str = "ixc25_decode_kernels", link=()) -> str:
    """Compiles `sources` (default SOURCE, QUANT_SOURCE and OPTIM_SOURCE) into one library `name` in `cache_dir` (once per
    sources, compiler and flags; `link`: extra linker arguments) and returns the .so path."""
    cxx = compiler or os.environ.get("CXX") or "g++"
    sources = list(sources or [SOURCE, QUANT_SOURCE, OPTIM_SOURCE])
    exe = shutil.which(cxx)
    if exe is None:
        raise KernelBuildError(f"no C++ compiler {cxx!r} on PATH to build {sources[0]}")
    src = b""
    headers = sorted(os.path.join(os.path.dirname(SOURCE), f) for f in os.listdir(os.path.dirname(SOURCE))
                     if f.endswith(".h"))
    for fn in sources + headers:  # the shared headers are part of every library's key
        with open(fn, "rb") as f:
            src += f.read()
    key = hashlib.sha256(src + " ".join([exe] + CXXFLAGS + list(link)).encode()).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    path = os.path.join(cache_dir, f"{name}-{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=cache_dir)
        os.close(fd)
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel library into {cache_dir}: {e}") from e
    try:
        proc = subprocess.run([exe] + CXXFLAGS + ["-o", tmp] + sources + list(link), capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{cxx} failed on {' '.join(sources)} (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library_path() -> Optional[str]:
    """The built library, or None when it cannot be built (the reason is logged once)."""
    d = _cache_dir()
    with _lock:
        if d not in _built:
            try:
                _built[d] = (build_library(d), "")
            except (KernelBuildError, OSError) as e:
                _built[d] = (None, str(e))
                log.warning("fused CPU decode kernels unavailable, using the portable ops: %s", e)
        return _built[d][0]


def switch(dtype, requested: Optional[bool] = None) -> bool:
    """Whether the decode step uses the fused CPU kernels. requested None: the env switch (`auto` when unset);
    True where they cannot run is an error rather than a silent fallback."""
    if requested is None:
        env = os.environ.get("IXC25_CPU_KERNELS", "auto").strip().lower()
        if env not in ("auto", "0", "1"):
            raise ValueError(f"IXC25_CPU_KERNELS must be auto, 0 or 1, not {env!r}")
        requested = None if env == "auto" else env == "1"
    if requested is False:
        return False
    target = ms.get_context("device_target")
    if target != "CPU" or dtype != ms.float32:
        if requested:
            raise ValueError(f"the fused CPU decode kernels need device_target 'CPU' and float32 "
                             f"(have {target}, {dtype})")
        return False
    path = library_path()
    if path is None and requested:
        raise KernelBuildError(f"the fused CPU decode kernels were required but could not be built: "
                               f"{_built[_cache_dir()][1]}")
    return path is not None


class DecodeKernels:
    """The Custom ops of one model (one Primitive per kernel, shared by its layers); fp32, contiguous."""

    def __init__(self, path: str, kv_heads: int, groups: int):
        def op(name, shape, dtype):
            return ops.Custom(f"{path}:{name}", out_shape=shape, out_dtype=dtype, func_type="aot")

        def rope_shapes(qkv, mq, mk):  # qkv (B, 1, kvh*(G+2)*d), mq (B, d, d)
            b, d = mq[0], mq[2]
            return [[b * kv_heads, groups, d], [b * kv_heads, 1, d], [b * kv_heads, 1, d]]

        self.rms_norm = op("IxcRmsNorm", _first, _first)  # x (..., H), w (H), eps (1)
        self.add_rms_norm = op("IxcAddRmsNorm", _first_twice, _first_twice)  # -> (x + r, norm(x + r) * w)
        self.rope_split = op("IxcRopeSplit", rope_shapes, lambda qkv, mq, mk: [qkv, qkv, qkv])
        self.swiglu = op("IxcSwiGLU", _first, _first)  # a, b -> silu(a) * b
        # q (B*kvh, G, d), k/v caches (B*kvh, C, d), mask (B, 1, 1, C) -> (B*kvh, G, d): scores, softmax, sum
        self.decode_attn = op("IxcDecodeAttn", _first, _first)
        # a decode layer with int8 packed weights in three launches (language.layers.DecoderLayer.decode_int8):
        # y, wqkv, scale, mq, mk -> q, k, v; q, k/v caches, mask, wo, scale, s, norm w, eps -> s', y';
        # y, w1, s1, w3, s3, w2, s2, s, norm w, eps -> s', y'
        self.qkv_int8 = op("IxcQkvInt8", lambda y, w, sc, mq, mk: rope_shapes(None, mq, None),
                           lambda y, w, sc, mq, mk: [y, y, y])
        self.attn_out_int8 = op("IxcAttnOutInt8", lambda q, kc, vc, m, w, sc, s, nw, e: [s, s],
                                lambda q, kc, vc, m, w, sc, s, nw, e: [s, s])
        self.ffn_int8 = op("IxcFfnInt8", lambda y, w1, s1, w3, s3, w2, s2, s, nw, e: [s, s],
                           lambda y, w1, s1, w3, s3, w2, s2, s, nw, e: [s, s])


def _first(x, *rest):
    return x


def _first_twice(x, *rest):
    return [x, x]


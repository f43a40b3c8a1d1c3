"""The fused fp32 CPU decode kernels (ixc25_ms/cpu_kernels.py): each op against numpy, the switch, the build."""
import logging
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ixc25_ms import cpu_kernels as ck
from ixc25_ms.language import decode_rope_matrices, rotate_half_matrix


@pytest.fixture(scope="module")
def kernels():
    return ck.DecodeKernels(ck.build_library(), kv_heads=2, groups=3)


def _rms_ref(s, w, eps):
    s64 = s.astype(np.float64)
    return (s64 / np.sqrt((s64 ** 2).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 1, 37), (2, 1, 4096)])
def test_rms_norm_and_add_rms_norm(kernels, shape):
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    eps = Tensor(np.float32(1e-6))
    y = kernels.rms_norm(Tensor(x), Tensor(w), eps).asnumpy()
    np.testing.assert_allclose(y, _rms_ref(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    s, y = kernels.add_rms_norm(Tensor(x), Tensor(r), Tensor(w), eps)
    np.testing.assert_array_equal(s.asnumpy(), x + r)  # the residual stream: an exact fp32 add
    np.testing.assert_allclose(y.asnumpy(), _rms_ref(x + r, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b,kvh,g,d", [(2, 2, 3, 8), (1, 8, 4, 128)], ids=["tiny", "7b-shapes"])
def test_rope_split_matches_split_and_rope(b, kvh, g, d):
    """qkv in the per-group layout [q x G, k, v] -> q @ Mq, k @ Mk, v: as the portable split + RoPE matmuls
    (7b-shapes: the real model's 8 KV heads of 4 query heads, head_dim 128)."""
    kernels = ck.DecodeKernels(ck.build_library(), kv_heads=kvh, groups=g)
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((b, 1, kvh * (g + 2) * d)).astype(np.float32)
    ang = rng.uniform(0, 6, (b, 1, d)).astype(np.float32)
    mq, mk = decode_rope_matrices(np.cos(ang), np.sin(ang), 0.25)
    q, k, v = (t.asnumpy() for t in kernels.rope_split(Tensor(qkv), Tensor(mq), Tensor(mk)))
    grp = qkv.reshape(b, kvh, g + 2, d)
    np.testing.assert_allclose(q, np.einsum("bhgd,bde->bhge", grp[:, :, :g], mq).reshape(b * kvh, g, d),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, np.einsum("bhd,bde->bhe", grp[:, :, g], mk).reshape(b * kvh, 1, d),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v, grp[:, :, g + 1].reshape(b * kvh, 1, d))
    # and Mk is RoPE: k*cos + rotate_half(k)*sin
    kk = grp[:, :, g]
    rope = kk * np.cos(ang) + (kk @ rotate_half_matrix(d)) * np.sin(ang)
    np.testing.assert_allclose(k.reshape(b, kvh, d), rope, rtol=1e-5, atol=1e-5)


def test_swiglu_against_float64(kernels):
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.standard_normal(5000) * 4, [-120.0, -88.5, -20.0, 0.0, 20.0, 88.5, 120.0]])
    a = a.astype(np.float32)[None, None]
    b = rng.standard_normal(a.shape).astype(np.float32)
    y = kernels.swiglu(Tensor(a), Tensor(b)).asnumpy()
    a64 = a.astype(np.float64)
    ref = a64 / (1 + np.exp(-a64)) * b
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("b,kvh,g,d,c", [(2, 2, 3, 8, 37), (1, 8, 4, 128, 1300)], ids=["tiny", "7b-shapes"])
def test_decode_attention_against_float64(b, kvh, g, d, c):
    """One token's attention over the cache (scores, additive mask with invalid slots, softmax, weighted sum)
    against float64 numpy; 7b-shapes: 8 KV heads of 4 queries, head_dim 128, a 1,300-slot cache."""
    kernels = ck.DecodeKernels(ck.build_library(), kv_heads=kvh, groups=g)
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((b * kvh, g, d)) / np.sqrt(d)).astype(np.float32)
    k, v = (rng.standard_normal((b * kvh, c, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, c), np.int64)
    valid[0, : c // 3] = 0  # left padding of the first row
    valid[-1, -5:] = 0  # slots not written yet
    from ixc25_ms.language.cache import decode_mask
    mask = decode_mask(valid)
    out = kernels.decode_attn(Tensor(q), Tensor(k), Tensor(v), Tensor(mask)).asnumpy()
    s = np.einsum("bgd,bcd->bgc", q.astype(np.float64), k.astype(np.float64))
    s = s + np.repeat(mask[:, 0, 0, :].astype(np.float64), kvh, 0)[:, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bgc,bcd->bgd", p, v.astype(np.float64))
    assert out.shape == ref.shape
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 1e-6, f"relative Frobenius {rel:.2e}"


def test_switch_env_and_dtype(monkeypatch):
    assert ms.get_context("device_target") == "CPU"
    monkeypatch.setenv("IXC25_CPU_KERNELS", "0")
    assert ck.switch(ms.float32) is False
    monkeypatch.setenv("IXC25_CPU_KERNELS", "1")
    assert ck.switch(ms.float32) is True
    with pytest.raises(ValueError, match="float32"):
        ck.switch(ms.float16)  # required where it cannot run: an error, not a silent fallback
    monkeypatch.setenv("IXC25_CPU_KERNELS", "auto")
    assert ck.switch(ms.float32) is True and ck.switch(ms.float16) is False
    assert ck.switch(ms.float32, requested=False) is False
    monkeypatch.setenv("IXC25_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="IXC25_CPU_KERNELS"):
        ck.switch(ms.float32)


def test_build_failure_falls_back_or_raises(tmp_path, monkeypatch, caplog):
    """No compiler: auto falls back to the portable ops with a warning; required raises; nothing half-written."""
    from ixc25_ms.language import InternLM2ForCausalLM
    from parity_tests.helpers import tiny_config
    monkeypatch.setenv("IXC25_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-ixc25")
    monkeypatch.setattr(ck, "_built", {})
    with caplog.at_level(logging.WARNING, logger="ixc25_ms.cpu_kernels"):
        lm = InternLM2ForCausalLM(tiny_config(), cpu_kernels=None)
    assert lm.cpu_kernels is False and lm.model.kernels is None
    assert "no-such-compiler-ixc25" in caplog.text
    with pytest.raises(ck.KernelBuildError, match="no-such-compiler-ixc25"):
        InternLM2ForCausalLM(tiny_config(), cpu_kernels=True)


def test_compile_error_leaves_no_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(ck, "SOURCE", str(bad))
    cache = tmp_path / "cache"
    with pytest.raises(ck.KernelBuildError, match="bad.cc"):
        ck.build_library(str(cache))
    assert os.listdir(cache) == []


def test_build_is_cached(tmp_path):
    cache = str(tmp_path / "cache")
    p1 = ck.build_library(cache)
    mtime = os.path.getmtime(p1)
    assert ck.build_library(cache) == p1 and os.path.getmtime(p1) == mtime
    assert os.listdir(cache) == [os.path.basename(p1)]

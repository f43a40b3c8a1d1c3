"""The fused CPU attention (ixc25_ms.fused_attention) against the portable ops and float64 numpy:
output and the gradients of q, k, v, with GQA, padding, causal masks and several row chunks; PyNative and jit."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ixc25_ms.language.cache import prefill_mask
from ixc25_ms.fused_attention import fused_attention


def _reference(q, k, v, mask, dout):
    """float64 numpy: out, and the gradients of sum(out * dout) in q, k, v."""
    b, h, l, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    kk, vv = np.repeat(k, g, 1), np.repeat(v, g, 1)
    s = q @ kk.transpose(0, 1, 3, 2) + mask
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = p @ vv
    dp = dout @ vv.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = ds @ kk
    dk = (ds.transpose(0, 1, 3, 2) @ q).reshape(b, kvh, g, -1, d).sum(2)
    dv = (p.transpose(0, 1, 3, 2) @ dout).reshape(b, kvh, g, -1, d).sum(2)
    return out, dq, dk, dv


class _Loss(nn.Cell):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def construct(self, q, k, v, mask, dout):
        return (self.attend(q, k, v, mask)[0] * dout).sum()


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("b,h,kvh,l,d,masking", [
    (1, 4, 2, 40, 16, "padded"),  # left padding: fully masked query rows too
    (2, 6, 2, 300, 8, "padded"),  # 900 rows a group: two row chunks
    (2, 4, 4, 50, 8, "shared"),  # one (1, 1, L, L) mask for the batch
    (2, 4, 4, 50, 8, "none"),  # (1, 1, 1, 1): no mask (the ViT)
])
def test_fused_attention_matches_float64(use_jit, b, h, kvh, l, d, masking):
    att = fused_attention(ms.float32, True)
    rng = np.random.default_rng(l + h)
    q = (rng.standard_normal((b, h, l, d)) / np.sqrt(d)).astype(np.float32)
    k = rng.standard_normal((b, kvh, l, d)).astype(np.float32)
    v = rng.standard_normal((b, kvh, l, d)).astype(np.float32)
    am = np.ones((b, l), np.int64)
    am[-1, : l // 5] = 0
    mask = {"padded": prefill_mask(am), "shared": prefill_mask(am[:1] * 0 + 1),
            "none": np.zeros((1, 1, 1, 1), np.float32)}[masking]
    dout = rng.standard_normal((b, h, l, d)).astype(np.float32)
    ref = _reference(*(x.astype(np.float64) for x in (q, k, v, mask, dout)))
    grad = ms.value_and_grad(_Loss(att.op), (0, 1, 2))
    if use_jit:
        grad = ms.jit(grad)
    loss, (dq, dk, dv) = grad(*(Tensor(x) for x in (q, k, v, mask, dout)))
    out = att.op(Tensor(q), Tensor(k), Tensor(v), Tensor(mask))[0].asnumpy()
    for name, ours, r in (("out", out, ref[0]), ("dq", dq.asnumpy(), ref[1]), ("dk", dk.asnumpy(), ref[2]),
                          ("dv", dv.asnumpy(), ref[3])):
        rel = np.linalg.norm(ours - r) / np.linalg.norm(r)
        assert rel <= 1e-5, f"{name}: relative Frobenius {rel:.2e}"
    assert abs(float(loss.asnumpy()) - float((ref[0] * dout).sum())) <= 1e-4 * abs(float((ref[0] * dout).sum()))


def test_fused_attention_in_a_dynamic_shape_graph():
    """The trainer compiles with dynamic lengths (jit(dynamic=1)): from the third shape on MindSpore runs one
    dynamic-shape graph, whose shapes the op infers in C++ (a Python out_shape failed there: "The pointer[value]
    is null"). Every length, static or dynamic graph, matches float64."""
    att = fused_attention(ms.float32, True)
    grad = ms.jit(ms.value_and_grad(_Loss(att.op), (0, 1, 2)), dynamic=1)
    for l in (24, 40, 56, 72):
        rng = np.random.default_rng(l)
        q = (rng.standard_normal((1, 4, l, 8)) / np.sqrt(8)).astype(np.float32)
        k, v, dout = (rng.standard_normal(s).astype(np.float32) for s in ((1, 2, l, 8), (1, 2, l, 8), (1, 4, l, 8)))
        am = np.ones((1, l), np.int64)
        am[0, :3] = 0
        mask = prefill_mask(am)
        ref = _reference(*(x.astype(np.float64) for x in (q, k, v, mask, dout)))
        loss, grads = grad(*(Tensor(x) for x in (q, k, v, mask, dout)))
        for name, ours, r in zip(("dq", "dk", "dv"), grads, ref[1:]):
            assert ours.shape == r.shape, f"L={l} {name}: shape {ours.shape}"
            rel = np.linalg.norm(ours.asnumpy() - r) / np.linalg.norm(r)
            assert rel <= 1e-5, f"L={l} {name}: relative Frobenius {rel:.2e}"
        assert abs(float(loss.asnumpy()) - float((ref[0] * dout).sum())) <= 1e-4 * abs(float((ref[0] * dout).sum()))


def test_fused_attention_off_switch(monkeypatch):
    monkeypatch.setenv("IXC25_CPU_KERNELS", "0")
    assert fused_attention(ms.float32) is None
    monkeypatch.delenv("IXC25_CPU_KERNELS")
    assert fused_attention(ms.float16) is None  # fp32 only

"""The compiled decode graph writes the KV cache in place: kernels listed by scripts/graph_ops.py (profiler)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scripts.graph_ops import collect  # noqa: E402


def test_decode_graph_kernels(tmp_path):
    res = collect(str(tmp_path), cpu_kernels=False)  # the portable ops (what Ascend runs)
    dec, pre = res["decode"], res["prefill"]
    layers = 2  # the --quick LLM
    # in-place cache write: one IndexAdd per K and per V cache, and no full-cache Select/copy ops; the
    # (B*kvh, C, d) cache Parameters are read without a Reshape (on CPU a Reshape of a Parameter copies it)
    assert dec.get("IndexAdd") == 2 * layers, dec
    for op in ("Select", "ScatterNdUpdate", "TensorScatterUpdate", "ScatterUpdate", "Transpose", "Concat"):
        assert op not in dec, f"decode graph launches {op}: {dec}"
    assert dec.get("Reshape", 0) <= 1, f"a cache is copied by a Reshape: {dec}"
    assert dec.get("Gather") == 1, "token ids are embedded inside the decode graph"
    assert "IndexAdd" not in pre
    # per layer: q.k^T and p.v, RoPE of q (scale folded in) and of k as small matmuls, and one sum of
    # squares per RMSNorm; plus the final norm
    assert dec.get("BatchMatMul") == 6 * layers + 1, dec
    norms = 2 * layers + 1
    # Addcmul: two per RMSNorm, one per MLP (silu(a)*b as a*sigmoid(a)*b); no Mul left
    assert dec.get("Addcmul") == 2 * norms + layers and "ReduceMean" not in dec, f"RMSNorm/MLP: {dec}"
    assert "Mul" not in dec, f"RoPE, the softmax scale, RMSNorm and SiLU*gate launch no Mul: {dec}"
    # no rotate_half slices/neg/concat anywhere
    assert "Neg" not in dec and "Neg" not in pre
    assert sum(dec.values()) <= 63, f"{sum(dec.values())} launches per decode step (86 on 2026-11-23, 63 now)"


def test_decode_graph_kernels_fused_cpu(tmp_path):
    """With the fused CPU kernels: one kernel per RMSNorm (the residual add before it included), one for the
    q/k/v split + RoPE, one for the attention over the cache (scores, mask, softmax, sum), one for SwiGLU;
    the linears and cache writes as in the portable graph."""
    dec = collect(str(tmp_path), cpu_kernels=True)["decode"]
    layers = 2
    assert dec.get("Custom") == 1 + 5 * layers, dec  # first norm; per layer 2 add+norm, rope/split, attention, SwiGLU
    assert dec.get("IndexAdd") == 2 * layers, dec
    for op in ("Addcmul", "Rsqrt", "Sigmoid", "StridedSlice", "Mul", "Add", "Softmax", "BatchMatMul"):
        assert op not in dec, f"decode graph launches {op}: {dec}"
    assert sum(dec.values()) <= 28, f"{sum(dec.values())} launches per decode step (63 with the portable ops)"

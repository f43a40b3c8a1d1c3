"""The compiled decode graph writes the KV cache in place: kernels listed by scripts/graph_ops.py (profiler)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scripts.graph_ops import collect  # noqa: E402


def test_decode_graph_kernels(tmp_path):
    res = collect(str(tmp_path))
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
    assert dec.get("Addcmul") == 2 * norms and "ReduceMean" not in dec, f"RMSNorm decode path: {dec}"
    assert dec.get("Mul", 0) == 2 * layers, f"only SiLU's and the gate's Mul left: {dec}"
    # no rotate_half slices/neg/concat anywhere
    assert "Neg" not in dec and "Neg" not in pre
    assert sum(dec.values()) <= 66, f"{sum(dec.values())} launches per decode step (86 in session 1, 66 now)"

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
    # in-place cache write: one ScatterUpdate per K and per V cache, and no full-cache Select/copy ops
    assert dec.get("ScatterUpdate") == 2 * layers, dec
    for op in ("Select", "ScatterNdUpdate", "TensorScatterUpdate", "Transpose", "Concat"):
        assert op not in dec, f"decode graph launches {op}: {dec}"
    assert dec.get("Gather") == 1, "token ids are embedded inside the decode graph"
    assert dec.get("BatchMatMul") == 2 * layers and "ScatterUpdate" not in pre
    # one RoPE matmul per layer on the fused qkv, no rotate_half slices/neg/concat
    assert "Neg" not in dec and "Neg" not in pre
    assert sum(dec.values()) < 100, f"{sum(dec.values())} launches per decode step (was 86 when written)"

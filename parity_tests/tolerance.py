"""Parity metrics and the per-dtype tolerance table shared by every parity test and the parity tool."""
from __future__ import annotations

import numpy as np

# dtype -> (max relative Frobenius error, max abs error relative to max|ref|)
TOLERANCE = {
    "fp32": {"rel_fro": 1e-5, "max_abs_rel": 1e-4},
    "fp16": {"rel_fro": 5e-3, "max_abs_rel": 2e-2},
    "bf16": {"rel_fro": 1e-2, "max_abs_rel": 5e-2},
}


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "asnumpy"):
        x = x.asnumpy()
    elif hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def compare(ours, ref) -> dict:
    """max_abs, rel_fro (||a-b||/||b||), cosine similarity, over float64 copies."""
    a = to_numpy(ours).astype(np.float64)
    b = to_numpy(ref).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {a.shape} vs reference {b.shape}")
    d = a - b
    nb = np.linalg.norm(b)
    na = np.linalg.norm(a)
    return {
        "max_abs": float(np.abs(d).max()) if d.size else 0.0,
        "rel_fro": float(np.linalg.norm(d) / max(nb, 1e-30)),
        "cos": float((a * b).sum() / max(na * nb, 1e-30)),
        "ref_max": float(np.abs(b).max()) if b.size else 0.0,
    }


def passes(metrics: dict, dtype: str = "fp32", table: dict | None = None) -> bool:
    tol = (table or TOLERANCE)[dtype]
    return (metrics["rel_fro"] <= tol["rel_fro"]
            and metrics["max_abs"] <= tol["max_abs_rel"] * max(metrics["ref_max"], 1e-6))


def assert_close(ours, ref, dtype: str = "fp32", name: str = "", table: dict | None = None) -> dict:
    """Assert parity against the tolerance table; returns the metrics (printed with -s)."""
    m = compare(ours, ref)
    print(f"[parity] {name or 'tensor'} {dtype}: max_abs={m['max_abs']:.3e} rel_fro={m['rel_fro']:.3e} "
          f"cos={m['cos']:.8f}")
    assert passes(m, dtype, table), f"{name}: parity failed for {dtype}: {m} (tolerance {(table or TOLERANCE)[dtype]})"
    return m

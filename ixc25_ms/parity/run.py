"""run_parity: the MindSpore side, then the reference compared row by row, then the report dict."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Mapping, Optional, Sequence

from ..testing.memory import peak_rss_mb, release_host_memory, vm
from .compare import Comparer, load_tolerance_table
from .ms_side import DTYPE_NAMES, run_mindspore
from .store import ActivationStore


def run_parity(model: str, images: Sequence = (), query: str = "Describe this image in detail.",
               dtype: str = "fp32", mode: str = "pynative", steps: int = 4, tolerance_table: Optional[str] = None,
               ms_model: Optional[str] = None, ms_weights: Optional[Mapping] = None,
               ref_weights: Optional[Mapping] = None, ref_dtype: str = "fp32", hd_num: int = 24,
               infer_mode: str = "base", workdir: Optional[str] = None, keep: bool = False, log=print) -> dict:
    """Run both sides and return the report dict (rows in capture order, first_failure, passed, ...).

    ms_model: a different checkpoint directory for the MindSpore side (config/tokenizer/weights);
    ms_weights / ref_weights: weight mappings (official keys) replacing each side's checkpoint weights."""
    from .torch_side import run_reference
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    if mode not in ("pynative", "graph"):
        raise ValueError(f"mode must be 'pynative' or 'graph', got {mode!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    for img in images:
        if not os.path.isfile(img):
            raise FileNotFoundError(f"{img}: no such image file")
    table, overrides = load_tolerance_table(tolerance_table)
    if dtype not in table:
        raise ValueError(f"tolerance table has no entry for {dtype}")
    root = workdir or tempfile.mkdtemp(prefix="ixc25-parity-")
    store = ActivationStore(root)
    try:
        t_all = time.perf_counter()
        run_mindspore(ms_model or model, images, query, store, dtype, mode, steps, hd_num, infer_mode,
                      ms_weights, log)
        release_host_memory()
        rss_ms = store.meta["peak_rss_mb_ms"]
        rss_freed = vm("VmRSS")
        emit = Comparer(store, dtype, table, overrides, log)
        ref_ids = run_reference(model, store, emit, ref_dtype, images, infer_mode, ref_weights, log)
        rows = []
        for r in store.rows:  # capture order
            rows.append(emit.results.get(r["name"], {"module": r["name"], "shape": r["shape"], "pass": False,
                                                      "error": "not produced by the reference"}))
        for name, r in emit.results.items():
            if not any(x["module"] == name for x in rows):
                rows.append(r)
        ours_ids = store.meta["greedy_ids"]
        if steps:
            mism = next((k for k, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None)
            row = {"module": "generate.greedy_ids", "shape": [1, steps], "ours": ours_ids, "ref": ref_ids,
                   "pass": mism is None}
            if mism is not None:
                row["mismatch_step"] = mism
                row["ref_top2_margin"] = store.meta["ref_margins"][mism]
            rows.append(row)
        first = next((r["module"] for r in rows if not r["pass"]), None)
        report = {
            "tool": "ixc25-parity", "model": model, "ms_model": ms_model, "images": list(images), "query": query,
            "dtype": dtype, "ref_dtype": ref_dtype, "mode": mode, "steps": steps, "hd_num": hd_num,
            "infer_mode": infer_mode,
            "ms_weights_overridden": ms_weights is not None, "ref_weights_overridden": ref_weights is not None,
            "tolerance": table[dtype], "tolerance_overrides": overrides,
            "seq_len": store.meta["seq_len"], "n_image_tokens": store.meta["n_image_tokens"],
            "segments": [{k: v for k, v in s.items() if k != "ids"} | ({"n_ids": len(s["ids"])} if "ids" in s else {})
                         for s in store.meta["segments"]],
            "greedy_ids": {"ours": ours_ids, "ref": ref_ids},
            "rows": rows, "n_rows": len(rows), "n_failed": sum(not r["pass"] for r in rows),
            "first_failure": first, "passed": first is None,
            "timings_s": {k: round(v, 3) for k, v in store.meta["timings"].items()},
            "total_s": round(time.perf_counter() - t_all, 3),
            "peak_rss_mb": {"after_mindspore": round(rss_ms, 1), "after_reference": round(peak_rss_mb(), 1)},
            "rss_mb_after_mindspore_freed": round(rss_freed, 1),
            "workdir": root if keep else None,
        }
        return report
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)

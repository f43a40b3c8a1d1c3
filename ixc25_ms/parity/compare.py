"""Row comparison for the parity tool: float64-chunked metrics, the tolerance table, the per-row verdict."""
from __future__ import annotations

import copy
import fnmatch
import json
from typing import Dict, Optional

import numpy as np

from parity_tests.tolerance import TOLERANCE, compare, passes, to_numpy

CHUNK = 1 << 22  # elements per float64 chunk in compare_chunked


def compare_chunked(ours: np.ndarray, ref: np.ndarray, chunk: int = CHUNK) -> dict:
    """tolerance.compare's metrics (max_abs, rel_fro, cos, ref_max) accumulated over float64 chunks, so
    large tensors (logits of long prompts) need no full float64 copies."""
    if ours.size <= chunk:
        return compare(ours, ref)
    a, b = ours.reshape(-1), ref.reshape(-1)
    max_abs = ref_max = dd = aa = bb = ab = 0.0
    for i in range(0, a.size, chunk):
        x = a[i:i + chunk].astype(np.float64)
        y = b[i:i + chunk].astype(np.float64)
        d = x - y
        max_abs = max(max_abs, float(np.abs(d).max()))
        ref_max = max(ref_max, float(np.abs(y).max()))
        dd += float(d @ d)
        aa += float(x @ x)
        bb += float(y @ y)
        ab += float(x @ y)
    nb, na = np.sqrt(bb), np.sqrt(aa)
    return {"max_abs": max_abs, "rel_fro": float(np.sqrt(dd) / max(nb, 1e-30)),
            "cos": float(ab / max(na * nb, 1e-30)), "ref_max": ref_max}


def load_tolerance_table(path: Optional[str]):
    """(table, module overrides). The file is JSON: {"fp32": {"rel_fro": .., "max_abs_rel": ..}, ...,
    "modules": {"glob pattern": {"fp16": {...}}}}; given entries update the defaults."""
    table = copy.deepcopy(TOLERANCE)
    overrides = {}
    if path:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        for k, v in d.items():
            if k == "modules":
                overrides = dict(v)
            elif isinstance(v, dict):
                table.setdefault(k, {}).update(v)
            else:
                raise ValueError(f"{path}: entry {k!r} must be an object")
    for k, v in table.items():
        missing = {"rel_fro", "max_abs_rel"} - set(v)
        if missing:
            raise ValueError(f"tolerance table: dtype {k!r} lacks {sorted(missing)}")
    return table, overrides


class Comparer:
    """Compares each reference output with the saved MindSpore array as soon as it is produced; `results`
    holds one row dict per name."""

    def __init__(self, store, dtype: str, table: dict, overrides: dict, log=print):
        self.store, self.dtype, self.table, self.overrides, self.log = store, dtype, table, overrides, log
        self.results: Dict[str, dict] = {}

    def tolerance(self, name: str) -> dict:
        """The tolerance of row `name`: the dtype's entry updated by every matching module pattern."""
        tol = dict(self.table[self.dtype])
        for pat, per_dtype in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat) and self.dtype in per_dtype:
                tol.update(per_dtype[self.dtype])
        return tol

    def __call__(self, name: str, ref) -> None:
        ref = to_numpy(ref)
        try:
            ours = self.store.load(name)
        except KeyError:
            self.results[name] = {"module": name, "error": "not captured on the MindSpore side", "pass": False}
            return
        row = {"module": name, "shape": list(ours.shape), "ours_dtype": str(ours.dtype)}
        if ours.shape != ref.shape:
            row.update(error=f"shape mismatch: ours {list(ours.shape)} vs reference {list(ref.shape)}")
            row["pass"] = False
        else:
            m = compare_chunked(ours, ref)
            tol = self.tolerance(name)
            ok = passes(m, self.dtype, {self.dtype: tol}) and bool(np.isfinite(ours).all())
            row.update(max_abs=m["max_abs"], rel_fro=m["rel_fro"], cos=m["cos"], ref_max=m["ref_max"],
                       tolerance=tol, **{"pass": ok})
        self.results[name] = row

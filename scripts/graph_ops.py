"""List the kernels MindSpore actually launches for the compiled prefill and decode graphs (from the profiler).

    python scripts/graph_ops.py [--json out.json]

Builds a small random LLM (the bench's --quick widths), runs one jit prefill and a few jit decode steps
under `mindspore.Profiler` (CPU activity) and prints, per graph, every kernel type with its count per call.
This is what notes/ascend.md's op table is generated from: the ops of the graphs as compiled, not as written.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _profile(fn, calls: int, out_dir: str) -> dict:
    """{kernel type: launches per call} of `fn` run `calls` times under the profiler."""
    import mindspore as ms
    from mindspore.profiler import ProfilerActivity
    prof = ms.Profiler(output_path=out_dir, activities=[ProfilerActivity.CPU])
    prof.start()
    for _ in range(calls):
        fn()
    prof.stop()
    prof.analyse()
    files = glob.glob(os.path.join(out_dir, "*", "FRAMEWORK", "cpu_op_type_info_0.csv"))
    if not files:
        raise SystemExit(f"graph_ops: the profiler wrote no cpu_op_type_info under {out_dir}")
    counts = {}
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            counts[row["op_type"]] = int(row["type_occurrences"]) / calls
    return dict(sorted(counts.items()))


def collect(work: str, cpu_kernels: bool = False) -> dict:
    """Kernel counts of the prefill and decode graphs; cpu_kernels: the decode step with the fused CPU kernels
    (ixc25_ms/cpu_kernels.py) instead of the portable ops, which are what runs on Ascend."""
    import mindspore as ms
    from mindspore import Tensor

    from ixc25_ms.testing import QUICK_CFG, TinyModelTester

    ms.set_context(mode=ms.PYNATIVE_MODE)
    tester = TinyModelTester(QUICK_CFG, seed=0, init="bench")  # the bench's --quick weights
    cfg = tester.cfg
    lm = tester.ms_lm("float32", use_jit=True, cpu_kernels=cpu_kernels)
    l, cap = 24, 32
    x = Tensor(np.random.default_rng(0).standard_normal((1, l, cfg.hidden_size)).astype(np.float32) * 0.1)
    im = np.zeros((1, l), bool)
    im[:, 2:10] = True  # image tokens: the partial-LoRA branch is in the prefill graph
    am = np.ones((1, l), np.int64)

    def prefill():
        out = lm.prefill(x, im, am, cap=cap)
        out[0].asnumpy()
        return out

    _, _, cache = prefill()  # compile outside the profiled window; decode appends one slot per step

    def decode():
        lm.decode(np.array([[5]]), cache)[0].asnumpy()  # ids: Gather in the graph

    decode()
    return {"config": "bench --quick LLM (2 layers, GQA 4/2), fp32, CPU" + (", fused CPU decode kernels" if cpu_kernels else ""),
            "prefill": _profile(prefill, 2, os.path.join(work, "prefill")),
            "decode": _profile(decode, 4, os.path.join(work, "decode"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--cpu-kernels", action="store_true",
                    help="decode with the fused CPU kernels (default: the portable ops, as on Ascend)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ixc25-graph-ops-") as work:
        res = collect(work, a.cpu_kernels)
    for graph in ("prefill", "decode"):
        print(f"{graph} graph: {sum(res[graph].values()):.0f} kernel launches per call")
        for op, n in res[graph].items():
            print(f"  {op:24s} {n:g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

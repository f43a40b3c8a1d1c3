"""ixc25-parity command line: MindSpore port vs our PyTorch reference, module by module (exit 0 = all pass)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

os.environ.setdefault("GLOG_v", "3")


def build_parser() -> argparse.ArgumentParser:
    """The ixc25-parity argument parser."""
    p = argparse.ArgumentParser(
        prog="ixc25-parity",
        description="Module-by-module parity of the MindSpore IXC2.5 port against our PyTorch reference "
                    "(same weights, same input). Exit status 0 only when every module passes.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer.model, weights)")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="image or video file(s), in prompt order (none: a text-only prompt)")
    p.add_argument("--query", default="Describe this image in detail.", help="user query (default: %(default)r)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="MindSpore compute dtype")
    p.add_argument("--mode", choices=["pynative", "graph"], default="pynative",
                   help="graph: model built with use_jit=True (ViT forward_jit, jit prefill/decode); "
                        "per-layer rows always come from an eager pass with forward hooks")
    p.add_argument("--report", action="append", default=[], metavar="FILE",
                   help="write a report: .json or .md (repeatable)")
    p.add_argument("--tolerance-table", metavar="FILE", help="JSON tolerance table overriding the defaults")
    p.add_argument("--steps", type=int, default=4, help="greedy decoding steps to compare (default 4)")
    p.add_argument("--hd-num", type=int, default=24, help="HD crop budget (forced to 6 with several images)")
    p.add_argument("--infer-mode", choices=["base", "write", "web"], default="base")
    p.add_argument("--ref-dtype", choices=["fp32", "fp16"], default="fp32", help="PyTorch reference dtype")
    p.add_argument("--workdir", help="directory for the saved activations (kept); default a temp dir, removed")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the estimated memory (GiB) for --model's config.json and the --image geometry, "
                        "then exit (no weights are read)")
    p.add_argument("--ms-model", help=argparse.SUPPRESS)  # testing: a different checkpoint for the MindSpore side
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: parse argv, run (or estimate), print the table and summary, write the reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ..weights import CheckpointError
    from ..config import ConfigError, IXCConfig
    from .estimate import estimate_memory, input_geometry, tower_geometry
    from .report import format_table, summary_line, write_reports
    if args.estimate_memory:
        try:
            cfg = IXCConfig.from_file(args.model)
        except ConfigError as e:
            print(f"ixc25-parity: error: {e}", file=sys.stderr)
            return 2
        try:
            views, seq = input_geometry(args.image, args.hd_num, geometry=tower_geometry(cfg))
        except (OSError, ValueError) as e:
            print(f"ixc25-parity: error: {e}", file=sys.stderr)
            return 2
        est = estimate_memory(cfg, args.dtype, seq, views, args.steps, args.ref_dtype)
        print(json.dumps(est, indent=1))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("ixc25-parity: error: the PyTorch reference needs torch (pip install 'ixc25-ms[test]')",
              file=sys.stderr)
        return 2
    from .run import run_parity
    command = "ixc25-parity " + shlex.join(argv)
    try:
        report = run_parity(args.model, args.image, args.query, args.dtype, args.mode, args.steps,
                            args.tolerance_table, ms_model=args.ms_model, ref_dtype=args.ref_dtype,
                            hd_num=args.hd_num, infer_mode=args.infer_mode, workdir=args.workdir,
                            keep=bool(args.workdir))
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ixc25-parity: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(summary_line(report))
    try:
        write_reports(report, args.report, command)
    except (OSError, ValueError) as e:
        print(f"ixc25-parity: error: {e}", file=sys.stderr)
        return 2
    for p in args.report:
        print(f"[parity] report written: {p}")
    return 0 if report["passed"] else 1

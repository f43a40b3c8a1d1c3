"""`ixc25-convert`: official IXC2.5 PyTorch checkpoint -> MindSpore directory, and back with --to-torch."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ixc25_ms.config import ConfigError
from ixc25_ms.weights import CheckpointError

from .convert import convert_to_ms, convert_to_torch
from .units import TOOL, TOOL_VERSION, human, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=TOOL,
        description="Convert an official InternLM-XComposer-2.5 checkpoint (model.safetensors, sharded "
                    "safetensors + index, or pytorch_model*.bin with --allow-pickle) into a MindSpore "
                    "checkpoint directory, or one of ours back to the official layout with --to-torch.")
    p.add_argument("--src", required=True, help="source checkpoint directory (or a single weight file)")
    p.add_argument("--dst", required=True, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="cast floating-point tensors (default: keep each tensor's source dtype)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="weight-only int8 for the LLM's base linears and output head: int8 codes + one fp32 "
                        "scale per output channel (`<key>_scale`); safetensors only; see notes/quantization.md")
    p.add_argument("--format", choices=("safetensors", "ckpt"), default=None,
                   help="MindSpore file format (default safetensors; --to-torch always writes safetensors)")
    p.add_argument("--shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB, 1GiB (default 2GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pytorch_model*.bin via torch.load(weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst (atomically, at the end)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--to-torch", action="store_true",
                   help="convert an ixc25-convert output directory back to the official layout")
    p.add_argument("--version", action="version", version=f"{TOOL} {TOOL_VERSION}")
    return p


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup of the temp directory


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as e:
        parser.error(f"--shard-size: {e}")
    if args.to_torch and args.format == "ckpt":
        parser.error("--to-torch writes the official layout (safetensors); --format ckpt does not apply")
    if args.to_torch and args.allow_pickle:
        parser.error("--allow-pickle applies to official sources, not to --to-torch")
    if args.quantize and args.to_torch:
        parser.error("--quantize applies to official sources, not to --to-torch")
    if args.quantize and args.format == "ckpt":
        parser.error("--quantize writes safetensors shards; --format ckpt does not apply")
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.to_torch:
            s = convert_to_torch(args.src, args.dst, args.dtype, shard_size, args.overwrite, args.quiet)
        else:
            s = convert_to_ms(args.src, args.dst, args.dtype, args.format or "safetensors", shard_size,
                              args.allow_pickle, args.overwrite, args.quiet, args.quantize)
    except (CheckpointError, ConfigError) as e:
        print(f"{TOOL}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{TOOL}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if not args.quiet:
        sec = s["seconds"]["write"] or 1e-9
        print(f"{TOOL}: wrote {os.path.abspath(args.dst)}: {s['num_converted']} tensors "
              f"({s['num_dropped']} dropped), {s['num_shards']} shard(s), {human(s['total_size'])} "
              f"in {sec:.1f}s ({human(s['total_size'] / sec)}/s)"
              + (f"; skipped sub-directories {s['skipped']}" if s.get("skipped") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ixc25-chat: chat with an IXC2.5 checkpoint on MindSpore — one answer, or an interactive session with history."""
from __future__ import annotations

import argparse
import os
import sys


def _answer(model, tok, query, images, history, args, out=sys.stdout):
    pieces = []
    for piece in model.stream_chat(tok, query, images, history=history, max_new_tokens=args.max_new_tokens,
                                   do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                   repetition_penalty=args.repetition_penalty, hd_num=args.hd_num, seed=args.seed):
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    print(file=out, flush=True)
    return "".join(pieces)


def main(argv=None, stdin=None, out=None):
    ap = argparse.ArgumentParser(prog="ixc25-chat", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint directory (official layout or converted; default: the "
                    "embedded default model)")
    ap.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    ap.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--jit", action="store_true", help="compile with mindspore.jit (graph mode)")
    ap.add_argument("--sample", dest="do_sample", action="store_true", help="sample (default: greedy)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--repetition-penalty", type=float, default=1.005)
    ap.add_argument("--hd-num", type=int, default=24)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("question", nargs="?", help="ask once and exit; without it: interactive")
    args = ap.parse_args(argv)
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    for p in args.image + args.video:
        if not os.path.isfile(p):
            print(f"ixc25-chat: error: {p}: no such file", file=sys.stderr)
            return 2
    from ixc25_ms.processing import ImageError, load_image
    from ixc25_ms.video import is_video_path
    for p in args.image:  # decoded before the model loads: a broken picture is told at once
        try:
            load_image(p)
        except ImageError as e:
            print(f"ixc25-chat: error: --image {e}", file=sys.stderr)
            return 2
    images = args.image + args.video
    if args.question and images:  # a question chat would refuse is told before the model loads
        from ixc25_ms.prompt import placeholder_mismatch
        bad = placeholder_mismatch([args.question], len(images))
        if bad:
            print(f"ixc25-chat: error: the question: {bad[1]}", file=sys.stderr)
            return 2
    import ixc25_ms
    try:
        model, tok = ixc25_ms.load(args.model or ixc25_ms.DEFAULT_MODEL, dtype=args.dtype, use_jit=args.jit)
    except ixc25_ms.LOAD_ERRORS as e:
        print(f"ixc25-chat: error: {e}", file=sys.stderr)
        return 2
    if args.question:
        try:  # an image or video that cannot be decoded: one line naming it (ImageError and the video reader's)
            _answer(model, tok, args.question, images, [], args, out)
        except ValueError as e:
            print(f"ixc25-chat: error: {e}", file=sys.stderr)
            return 2
        return 0
    history = []
    print("ixc25-chat: /image PATH adds an image, /reset clears history and images, /quit exits", file=out)
    while True:
        print(">>> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, images = [], []
            print("(history and images cleared)", file=out)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not os.path.isfile(path):
                print(f"(no such file: {path})", file=out)
                continue
            if not is_video_path(path):  # a picture is decoded now: one that is not is never added
                try:
                    load_image(path)
                except ImageError as e:
                    print(f"(not added: {e})", file=out)
                    continue
            images.append(path)
            print(f"(image added: {path}; {len(images)} in all)", file=out)
            continue
        try:
            response = _answer(model, tok, line, images, history, args, out)
        except ValueError as e:  # e.g. a video that does not decode: it stays until /reset
            print(f"(error: {e}; /reset clears history and images)", file=out)
            continue
        history.append((line, response))


if __name__ == "__main__":
    sys.exit(main())

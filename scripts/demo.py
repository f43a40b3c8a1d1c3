"""ixc25-demo: the embedded default model (a tiny IXC2.5 trained here on drawn shapes) looks at a picture and answers.

Draws a fresh picture of coloured shapes (the seed is printed; `--seed` repeats it) or takes `--image PATH`,
asks two or three of the questions the model was trained for (or `--question`), streams each answer and says
how long each stage took. No download: the weights ship inside the package (ixc25_ms/default_model).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def pick_questions(scene, rng, n: int = 3):
    """Up to n different questions of the four kinds that this picture allows (describe always first)."""
    from ixc25_ms import shapes as S
    valid = S.valid_questions(scene)
    out = [(4, "")]
    for t in (1, 3, 2):
        opts = [q for q in valid if q[0] == t]
        if opts and len(out) < n:
            out.append(opts[int(rng.integers(len(opts)))])
    return [(S.question(t, s), S.answer(scene, t, s)) for t, s in out]


def truth(S, scene, q: str):
    """The drawing's answer to a question of your own, when it is one of the four the picture allows (one object
    of the asked shape or colour); None otherwise (the answer is then shown, not judged)."""
    qt = S.question_type(q)
    return S.answer(scene, *qt) if qt is not None and qt in S.valid_questions(scene) else None


def seed_type(text: str) -> int:
    """--seed: a whole number >= 0 (numpy's generators take no negative seed)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ixc25-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--image", default=None, help="a picture of your own (default: a freshly drawn one)")
    ap.add_argument("--question", action="append", default=[], help="ask this instead (repeatable)")
    ap.add_argument("--seed", type=seed_type, default=None, help="seed of the drawn picture (default: random, printed)")
    ap.add_argument("--out", default=os.path.join(os.getcwd(), "demo_out"), help="where the drawn picture is saved")
    ap.add_argument("--no-jit", dest="jit", action="store_false", help="run eagerly (PyNative)")
    args = ap.parse_args(argv)
    times = {}
    t = time.perf_counter()
    import numpy as np
    import ixc25_ms
    from ixc25_ms import shapes as S
    times["import mindspore + ixc25_ms"] = time.perf_counter() - t
    from ixc25_ms.prompt import placeholder_mismatch
    bad = placeholder_mismatch(args.question, 1)  # asked in one chat about one picture
    if bad:
        ap.error(f"--question {args.question[bad[0]]!r}: {bad[1]} (one picture; the earlier questions are history)")
    path = args.model or ixc25_ms.DEFAULT_MODEL
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"ixc25-demo: error: {path}: no model.safetensors (make the default model with "
              f"`python scripts/train_default.py`)", file=sys.stderr)
        return 2
    if args.image:  # a picture that cannot be read stops the demo here, in one line, before the model loads
        from ixc25_ms.processing import ImageError, load_image
        try:
            load_image(args.image)
        except ImageError as e:
            print(f"ixc25-demo: error: --image {e}", file=sys.stderr)
            return 2
    t = time.perf_counter()
    try:
        model, tok = ixc25_ms.load(path, use_jit=args.jit)
    except ixc25_ms.LOAD_ERRORS as e:
        print(f"ixc25-demo: error: {e}", file=sys.stderr)
        return 2
    times["load the model"] = time.perf_counter() - t
    if args.image:
        image, questions = args.image, [(q, None) for q in (args.question or ["Describe the image."])]
        print(f"picture: {image}")
    else:
        seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(1 << 31))
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        os.makedirs(args.out, exist_ok=True)
        image = os.path.join(args.out, f"shapes-{seed}.png")
        S.render(scene, rng).save(image)
        questions = [(q, truth(S, scene, q)) for q in args.question] or pick_questions(scene, rng)
        print(f"picture: {image} (drawn with seed {seed}, {scene.width}x{scene.height} px; repeat with --seed {seed})")
        print(f"  it shows: {S.describe(scene)}")
    print(f"model: {path}\n")
    history = []
    for q, want in questions:
        print(f"user: {q}")
        print("assistant: ", end="", flush=True)
        t = time.perf_counter()
        pieces = []
        for piece in model.stream_chat(tok, q, [image], history=history, max_new_tokens=48, do_sample=False):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        answer = "".join(pieces)
        history.append((q, answer))
        times[f"answer: {q}"] = time.perf_counter() - t
        qt = S.question_type(q)
        if want is not None and qt is not None:
            ok = S.is_correct(qt[0], qt[1], want, answer)
            print(f"  ({'right' if ok else 'wrong'}: the drawing says \"{want}\")")
        print()
    for k in ("preprocess_s", "vision_s", "generate_s"):
        if k in model.timings:
            times[f"  of all answers: {k[:-2]}"] = model.timings[k]
    print("timings:")
    for k, v in times.items():
        print(f"  {k:50s} {v:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

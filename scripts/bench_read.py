"""A read step of the default model's recipe with the frozen tower's equal views run once, against every view run.

The recipe's read stages (scripts/train_default.py) train the language model on small pictures with the ViT
frozen (`ixc25-finetune --fix_vit True`, 16 pictures a micro-batch). A small picture's training transform gives a
1x1 crop grid, whose global view equals its crop bit for bit, so the tower sees each picture once instead of twice
(`forward_inputs(dedupe=True)`, the default). This times one such step as the trainer runs it — the frozen tower's
forward on the micro-batch's views (compiled, one view a call), then the compiled loss and gradients of the
language model and projector — on the shipped default model and 16 drawn one-object pictures, both ways in one
process, alternating (A, B, A, B: the machine's phase hits both). The two must give the same features and loss
bit for bit before the times mean anything. Prints the medians and their ratio.

    python scripts/bench_read.py [--pictures 16 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def build(pictures: int, root: str):
    """The shipped model prepared as the read stage trains it, its collator, and a micro-batch of `pictures`
    small one-object pictures (200-560 px drawn, stored at 2/3 as the recipe stores them), one question each."""
    import mindspore as ms
    import numpy as np
    import ixc25_ms
    from ixc25_ms import shapes as S
    from ixc25_ms.train.args import FinetuneArgs
    from ixc25_ms.train.batch import Collator
    from ixc25_ms.train.data import parse_item
    from ixc25_ms.train.forward import TrainForward, vit_is_frozen
    from ixc25_ms.train.prepare import prepare
    model, tok = ixc25_ms.load(ixc25_ms.DEFAULT_MODEL, lazy_loras=False)
    args = FinetuneArgs(model_name_or_path=ixc25_ms.DEFAULT_MODEL, output_dir="unused", fix_vit=True,
                        fix_sampler=False, use_lora=False, hd_num=9, max_length=4096, plora_dropout=0.0)
    t = prepare(model, args, log=lambda *a: None)
    assert vit_is_frozen(t.names)
    items = []
    for k in range(pictures):
        rng = np.random.default_rng(90_000_000 + k)
        scene = S.random_scene(rng, 1, (200, 560))
        im = S.render(scene, rng)
        im = im.resize((max(1, round(im.width * 2 / 3)), max(1, round(im.height * 2 / 3))), resample=3)
        path = os.path.join(root, f"{k}.png")
        im.save(path)
        (_, _, q, a), = S.asked(scene, S.valid_questions(scene)[:1])
        items.append({"id": str(k), "image": [path], "conversations": [{"from": "human", "value": q},
                                                                      {"from": "bot", "value": a}]})
    col = Collator(tok, args.max_length, args.hd_num, model.vit.geometry)
    batch = col([parse_item(it, "bench", k) for k, it in enumerate(items)])
    model.set_train(True)
    grad = ms.jit(ms.value_and_grad(TrainForward(model, col.geo, vit_frozen=True), None, t.params))
    return model, batch, grad


def step(model, batch, grad, dedupe: bool):
    """One read step as the trainer runs it; returns (seconds, features, loss)."""
    from ixc25_ms.train.forward import forward_inputs
    t0 = time.perf_counter()
    inputs = forward_inputs(model, batch, vit_frozen=True, use_jit=True, dedupe=dedupe)
    loss, grads = grad(*inputs)
    loss = float(loss.asnumpy())  # waits for the step
    return time.perf_counter() - t0, inputs[4].asnumpy(), loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_read", description=__doc__.split("\n")[0])
    ap.add_argument("--pictures", type=int, default=16, help="pictures in the micro-batch (the recipe: 16)")
    ap.add_argument("--rounds", type=int, default=3, help="timed steps of each way, alternating")
    ap.add_argument("--json", default=None, metavar="PATH")
    a = ap.parse_args(argv)
    if a.pictures < 1 or a.rounds < 1:
        ap.error("--pictures and --rounds must be >= 1")
    with tempfile.TemporaryDirectory() as root:
        model, batch, grad = build(a.pictures, root)
        from ixc25_ms.vision import unique_views
        views, run = len(batch.views), len(unique_views(batch.views)[0])
        ref = {}
        for dedupe in (False, True):  # untimed: compiles both shapes, and the two ways must agree
            _, feats, loss = step(model, batch, grad, dedupe)
            ref[dedupe] = (feats.tobytes(), loss)
        if ref[False] != ref[True]:
            print("bench_read: the two ways differ; times not reported", file=sys.stderr)
            return 1
        times = {False: [], True: []}
        for _ in range(a.rounds):
            for dedupe in (False, True):
                times[dedupe].append(step(model, batch, grad, dedupe)[0])
    every, once = statistics.median(times[False]), statistics.median(times[True])
    out = {"pictures": a.pictures, "views": views, "views_run_with_dedupe": run, "rounds": a.rounds,
           "every_view_s": round(every, 3), "equal_views_once_s": round(once, 3), "speedup": round(every / once, 3),
           "loss": ref[True][1], "same_features_and_loss": True}
    print(f"read step, {a.pictures} pictures ({views} views, {run} distinct): every view {every:.3f} s, equal views once "
          f"{once:.3f} s (median of {a.rounds}) -> {every / once:.2f}x; features and loss equal bit for bit")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

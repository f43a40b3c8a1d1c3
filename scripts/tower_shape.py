"""Can the default model's ViT learn shape at all? Its tower alone, trained with a direct classification loss.

A diagnostic for the embedded default model (notes/default-model.md): when chat names shapes at chance, is it the
tower that cannot learn shape at this width and budget, or the language-model loss that does not teach it?
This trains the recipe's tower (scripts/train_default.py CONFIG and init_state: the same key names, widths and
initialisation) as our PyTorch reference computes it (parity_tests/reference/vision.py: CLIP embeddings,
pre-LayerNorm, encoder layers, features without post_layernorm), max-pools its patch features and adds one
linear head, with AdamW (weight decay 0.05, betas 0.9/0.98), 50 warmup steps and a cosine schedule, on
one-object pictures (shapes.random_scene, 200-560 px, seeds 90,500,000 + i; held-out 91,500,000 + i) scaled so
the longer side is the crop side and centred on a white square. It prints the held-out accuracy as it goes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from scripts import train_default as T

TRAIN_SEED, TEST_SEED = 90_500_000, 91_500_000


def pictures(n: int, seed0: int, side: int, task: str, radius=None):
    """(n, side, side, 3) uint8 one-object pictures and their labels (shape or colour index)."""
    from PIL import Image
    from ixc25_ms import shapes as S
    xs, ys = [], []
    for i in range(n):
        im, colour, shape = S.one_object_picture(seed0 + i, radius=radius)
        s = side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), resample=3)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        xs.append(np.asarray(canvas, np.uint8))
        ys.append(shape if task == "shape" else colour)
    return np.stack(xs), np.asarray(ys)


def object_share(x, patch: int):
    """(B, grid²) share of each patch's pixels that belong to an object: saturated or dark pixels (the drawn
    colours and outlines), where the light grey background and the white margin are neither."""
    import torch
    a = x.astype(np.int16)
    obj = ((a.max(-1) - a.min(-1)) > 60) | (a.min(-1) < 120)  # (B, H, W)
    b, h, w = obj.shape
    share = obj.reshape(b, h // patch, patch, w // patch, patch).mean((2, 4)).reshape(b, -1)
    return torch.from_numpy(share.astype(np.float32))


def pooled(f, pool: str, query=None, x=None, patch: int = 28):
    """(B, grid², C) patch features -> (B, C): max, mean, objmean (the mean over the patches the object covers in
    the pictures x: an oracle of where to look) or attn (softmax over patches of query(f) / sqrt(C))."""
    import torch
    if pool == "max":
        return f.max(1).values
    if pool == "mean":
        return f.mean(1)
    if pool == "objmean":
        a = object_share(x, patch).unsqueeze(-1)  # (B, grid², 1)
        return (a * f).sum(1) / a.sum(1).clamp_min(1e-6)
    if pool == "attn":
        a = torch.softmax(query(f) / math.sqrt(f.shape[-1]), 1)  # (B, grid², 1)
        return (a * f).sum(1)
    raise ValueError(f"pool must be max, mean, objmean or attn, got {pool!r}")


def run(steps: int = 500, batch: int = 16, lr: float = 1e-3, n_train: int = 4000, n_test: int = 300,
        vit_width: int = 64, vit_layers: int = 3, side: int = 560, patch: int = 28, task: str = "shape",
        every: int = 100, seed: int = 0, pool: str = "max", query_std: float = 0.02,
        vit_pos: str = "noise", radius=None, log=print) -> list:
    """Train and score; returns [{step, pictures, loss, accuracy, seconds}] at every `every` steps and the last.
    `pool`: how patch features become one vector (pooled): max, mean, objmean (the mean over the object's
    patches) or attn (one learned query, softmax over patches, started near uniform as a language model's
    attention starts); `query_std`: the attn query's initial std (0.02: near uniform; ~1 and above: peaked on
    some patches from the start); `radius`: the training objects' radius range (shapes.random_scene)."""
    import torch
    import torch.nn.functional as F
    from parity_tests.reference.vision import VisionReference, normalize_rgb
    config = json.loads(json.dumps(T.CONFIG))  # a copy: the recipe's CONFIG stays as it is
    vc = config["vision_config"]
    vc.update(hidden_size=vit_width, intermediate_size=4 * vit_width, num_attention_heads=max(1, vit_width // 32),
              num_hidden_layers=vit_layers, image_size=side, patch_size=patch)
    torch.manual_seed(seed)
    state = {k: v for k, v in T.init_state(seed, vit_pos, config=config).items() if k.startswith("vit.")}
    ref = VisionReference(state, vc)
    params = [t.requires_grad_() for t in ref.w.values()]
    classes = 3 if task == "shape" else 6
    head = torch.nn.Linear(vit_width, classes)
    query = None
    if pool == "attn":  # score_p = w . f_p
        query = torch.nn.Linear(vit_width, 1, bias=False)
        torch.nn.init.normal_(query.weight, std=query_std)
        params += list(query.parameters())
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    xtr, ytr = pictures(n_train, TRAIN_SEED, side, task, radius)  # held out: the task's own sizes
    xte, yte = pictures(n_test, TEST_SEED, side, task)
    log(f"[tower_shape] {n_train} + {n_test} pictures in {time.perf_counter() - t0:.0f} s; tower {vit_width} x "
        f"{vit_layers}, {patch}-px patches at {side} px; task {task} (chance {1 / classes:.2f})")

    def logits(x):
        views = torch.cat([normalize_rgb(im) for im in x])
        return head(pooled(ref.tower(views), pool, query, x, patch))

    def accuracy():
        with torch.no_grad():
            pred = np.concatenate([logits(xte[i:i + 50]).argmax(1).numpy() for i in range(0, len(xte), 50)])
        return float((pred == yte).mean())

    rows, rng, t0 = [], np.random.default_rng(seed), time.perf_counter()
    for step in range(1, steps + 1):
        rate = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = rate
        idx = rng.integers(0, n_train, batch)
        loss = F.cross_entropy(logits(xtr[idx]), torch.from_numpy(ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            rows.append({"step": step, "pictures": step * batch, "loss": round(float(loss.detach()), 4),
                         "accuracy": accuracy(), "seconds": round(time.perf_counter() - t0)})
            log(f"[tower_shape] {json.dumps(rows[-1])}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tower_shape", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pictures", type=int, default=4000, help="distinct training pictures")
    ap.add_argument("--vit_width", type=int, default=64)
    ap.add_argument("--vit_layers", type=int, default=3)
    ap.add_argument("--patch", type=int, default=28)
    ap.add_argument("--task", choices=("shape", "colour"), default="shape")
    ap.add_argument("--pool", choices=("max", "mean", "attn", "objmean"), default="max")
    ap.add_argument("--query_std", type=float, default=0.02, help="attn pooling: the query's initial std")
    ap.add_argument("--vit_pos", choices=("noise", "sincos"), default="noise", help="the position table's start")
    ap.add_argument("--radius", type=lambda t: T.span(t, float, 0.0), help="training objects' radius LO-HI as a share of the shorter side "
                    "(default: the task's 0.08-0.32); the held-out pictures keep the task's sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    rows = run(args.steps, args.batch, args.lr, args.pictures, vit_width=args.vit_width, vit_layers=args.vit_layers,
               patch=args.patch, task=args.task, pool=args.pool,
               query_std=args.query_std, vit_pos=args.vit_pos,
               radius=args.radius)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

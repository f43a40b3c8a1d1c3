"""Can the default model's ViT learn shape at all? Its tower alone, trained with a direct classification loss.

A diagnostic for the embedded default model (notes/default-model.md): when chat names shapes at chance, is it the
tower that cannot learn shape at this width and budget, or the language-model loss that does not teach it?
This trains the recipe's tower (scripts/train_default.py CONFIG and init_state: the same key names, widths and
initialisation) as our PyTorch reference computes it (parity_tests/reference/vision.py: CLIP embeddings,
pre-LayerNorm, encoder layers, features without post_layernorm), max-pools its patch features and adds one
linear head, with AdamW (weight decay 0.05, betas 0.9/0.98), 50 warmup steps and a cosine schedule, on
one-object pictures (shapes.random_scene, 200-560 px, seeds 90,500,000 + i; held-out 91,500,000 + i) scaled so
the longer side is the crop side and centred on a white square. It prints the held-out accuracy as it goes.
`--pool` swaps the max for other reads (pooled; `dense`: every patch classified), `--probe` ridge-probes the
trained features by mean, object mean and max, `--then_attn N` freezes the tower and trains a language-model-like
attention read of it (read_frozen), `--save_tower` writes it for `train_default.py --init_tower`.
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
    from ixc25_ms import shapes as S
    from ixc25_ms.train.tower_warmup import square_view
    xs, ys = [], []
    for i in range(n):
        im, colour, shape = S.one_object_picture(seed0 + i, radius=radius)
        xs.append(square_view(im, side))
        ys.append(shape if task == "shape" else colour)
    return np.stack(xs), np.asarray(ys)


def object_share(x, patch: int):
    """(B, grid²) share of each patch's pixels that belong to an object: saturated or dark pixels (the drawn
    colours and outlines), where the light grey background and the white margin are neither."""
    import torch
    from ixc25_ms.train.tower_warmup import patch_share
    a = x.astype(np.int16)
    obj = ((a.max(-1) - a.min(-1)) > 60) | (a.min(-1) < 120)  # (B, H, W)
    return torch.from_numpy(patch_share(obj, patch).astype(np.float32))


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


def probe(feats, x, y, patch: int) -> dict:
    """Ridge probe of the labels y off pooled features (B, grid², C): fit on the first half, scored on the second;
    {pool: accuracy} for mean, objmean and max (what an averaging read could find in the tokens)."""
    import torch
    out, half = {}, len(y) // 2
    for pool in ("mean", "objmean", "max"):
        z = pooled(feats, pool, x=x, patch=patch).numpy().astype(np.float64)
        z = (z - z[:half].mean(0)) / (z[:half].std(0) + 1e-6)
        z = np.concatenate([z, np.ones((len(z), 1))], 1)
        t = np.eye(int(y.max()) + 1)[y]
        w = np.linalg.solve(z[:half].T @ z[:half] + 1.0 * np.eye(z.shape[1]), z[:half].T @ t[:half])
        out[pool] = float(((z[half:] @ w).argmax(1) == y[half:]).mean())
    return out


def read_frozen(features, xtr, ytr, xte, yte, classes: int, steps: int, batch: int, lr: float, heads: int,
                seed: int, log=print, n_cache: int = 2000) -> dict:
    """The trained tower frozen, a new read of its patch features as a language model reads them: `heads`
    attention heads, each one learned query (std 0.02: near uniform at the start) over keys and values of the
    features, concatenated, then an MLP head; `steps` steps of `batch` on the first n_cache training pictures'
    cached features. Returns the last row ({"read": "attn", steps, accuracy})."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        ftr = torch.cat([features(xtr[i:i + 50]) for i in range(0, min(n_cache, len(xtr)), 50)])
        fte = torch.cat([features(xte[i:i + 50]) for i in range(0, len(xte), 50)])
    c = ftr.shape[-1]
    torch.manual_seed(seed + 1)
    key, value = torch.nn.Linear(c, c, bias=False), torch.nn.Linear(c, c, bias=False)
    query = torch.nn.Parameter(torch.randn(heads, c // heads) * 0.02)
    for w in (key.weight, value.weight):
        torch.nn.init.normal_(w, std=0.02)
    mlp = torch.nn.Sequential(torch.nn.Linear(c, 4 * c), torch.nn.GELU(), torch.nn.Linear(4 * c, classes))
    params = [query] + list(key.parameters()) + list(value.parameters()) + list(mlp.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))

    def read(f):  # (B, P, C) -> (B, classes)
        b, p, _ = f.shape
        k = key(f).view(b, p, heads, c // heads)
        v = value(f).view(b, p, heads, c // heads)
        a = torch.softmax(torch.einsum("bphd,hd->bph", k, query) / math.sqrt(c // heads), 1)
        return mlp(torch.einsum("bph,bphd->bhd", a, v).reshape(b, c))

    rng, row = np.random.default_rng(seed + 1), {}
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.integers(0, len(ftr), batch)
        loss = F.cross_entropy(read(ftr[idx]), torch.from_numpy(ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                acc = float((read(fte).argmax(1).numpy() == yte).mean())
            row = {"read": "attn", "heads": heads, "step": step, "loss": round(float(loss.detach()), 4), "accuracy": acc}
            log(f"[tower_shape] frozen tower, {json.dumps(row)}")
    return row


def run(steps: int = 500, batch: int = 16, lr: float = 1e-3, n_train: int = 4000, n_test: int = 300,
        vit_width: int = 64, vit_layers: int = 3, side: int = 560, patch: int = 28, task: str = "shape",
        every: int = 100, seed: int = 0, pool: str = "max", query_std: float = 0.02,
        vit_pos: str = "noise", radius=None, probe_at_end: bool = False, then_attn: int = 0, then_heads: int = 4,
        save_tower: str = "", log=print) -> list:
    """Train and score; returns [{step, pictures, loss, accuracy, seconds}] at every `every` steps and the last.
    `pool`: how patch features become one vector (pooled): max, mean, objmean (the mean over the object's
    patches), attn (one learned query, softmax over patches, started near uniform as a language model's
    attention starts) or dense (every patch classified: the object's shape or background; scored by the
    mean of the object's patch logits); `query_std`: the attn query's initial std (0.02: near uniform; ~1 and above: peaked on
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
    head = torch.nn.Linear(vit_width, classes + (pool == "dense"))  # dense: one more class, the background
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

    def features(x):
        return ref.tower(torch.cat([normalize_rgb(im) for im in x]))

    def logits(x):
        if pool == "dense":  # the mean of the object's patch logits over its classes
            return pooled(head(features(x))[..., :classes], "objmean", x=x, patch=patch)
        return head(pooled(features(x), pool, query, x, patch))

    def dense_loss(x, y):
        """Every patch names the shape of the object it lies in (over half covered) or the background; object and
        background patches weigh half each."""
        share = object_share(x, patch)
        target = torch.where(share > 0.5, torch.from_numpy(y)[:, None], torch.tensor(classes))
        per = F.cross_entropy(head(features(x)).flatten(0, 1), target.flatten(), reduction="none")
        on = (target.flatten() < classes).float()
        return 0.5 * (per * on).sum() / on.sum().clamp_min(1) + 0.5 * (per * (1 - on)).sum() / (1 - on).sum()

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
        if pool == "dense":
            loss = dense_loss(xtr[idx], ytr[idx])
        else:
            loss = F.cross_entropy(logits(xtr[idx]), torch.from_numpy(ytr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            rows.append({"step": step, "pictures": step * batch, "loss": round(float(loss.detach()), 4),
                         "accuracy": accuracy(), "seconds": round(time.perf_counter() - t0)})
            log(f"[tower_shape] {json.dumps(rows[-1])}")
    if save_tower:  # official key names (vit.vision_tower...): train_default --init_tower reads it
        from ixc25_ms.weights.safetensors import write_safetensors
        write_safetensors(save_tower + ".tmp", {k: ("F32", v.detach().numpy()) for k, v in ref.w.items()})
        os.replace(save_tower + ".tmp", save_tower)
    if then_attn:
        rows.append(read_frozen(features, xtr, ytr, xte, yte, classes, then_attn, batch, lr, then_heads, seed, log))
    if probe_at_end:
        with torch.no_grad():
            feats = torch.cat([features(xte[i:i + 50]) for i in range(0, len(xte), 50)])
        rows[-1]["probe"] = probe(feats, xte, yte, patch)
        log(f"[tower_shape] ridge probe of the held-out features (fit on half, scored on half): {rows[-1]['probe']}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tower_shape", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100, help="score the held-out pictures every this many steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pictures", type=int, default=4000, help="distinct training pictures")
    ap.add_argument("--vit_width", type=int, default=64)
    ap.add_argument("--vit_layers", type=int, default=3)
    ap.add_argument("--patch", type=int, default=28)
    ap.add_argument("--task", choices=("shape", "colour"), default="shape")
    ap.add_argument("--pool", choices=("max", "mean", "attn", "objmean", "dense"), default="max")
    ap.add_argument("--query_std", type=float, default=0.02, help="attn pooling: the query's initial std")
    ap.add_argument("--vit_pos", choices=("noise", "sincos"), default="noise", help="the position table's start")
    ap.add_argument("--radius", type=lambda t: T.span(t, float, 0.0), help="training objects' radius LO-HI as a share of the shorter side "
                    "(default: the task's 0.08-0.32); the held-out pictures keep the task's sizes")
    ap.add_argument("--probe", action="store_true", help="at the end, ridge-probe the held-out patch features "
                    "pooled by mean, objmean and max")
    ap.add_argument("--then_attn", type=int, default=0, help="then freeze the tower and train a language-model-like "
                    "attention read of its features (read_frozen) for this many steps")
    ap.add_argument("--then_heads", type=int, default=4)
    ap.add_argument("--save_tower", default="", help="write the trained tower here (safetensors, official key names)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    rows = run(args.steps, args.batch, args.lr, args.pictures, vit_width=args.vit_width, vit_layers=args.vit_layers,
               patch=args.patch, task=args.task, every=args.every, pool=args.pool,
               query_std=args.query_std, vit_pos=args.vit_pos,
               radius=args.radius, probe_at_end=args.probe, then_attn=args.then_attn, then_heads=args.then_heads,
               save_tower=args.save_tower)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

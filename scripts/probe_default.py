"""Linear probe of a model's sight: can a ridge classifier read an object's colour and shape off the image embeddings?

Draws one-object pictures (seeds 90,000,000 + i, a range no training uses), encodes each through the model's ViT,
HD transform and projector (`model.encode_img`: the (N, hidden) tokens the language model receives), pools the
tokens (mean, max and min over N, so 3 x hidden numbers a picture), fits a ridge classifier on the first
pictures and scores the rest. High probe accuracy with low chat accuracy says the language model does not read
what the tower shows; probe accuracy near chance says the tower does not show it (notes/default-model.md).
Pooling loses layout, so the shape probe is a floor: a spatial probe could read more. `--patch` is one: the ViT's
own output features at the one patch the object covers most (the picture scaled and centred as the tower warm-up
shows it, the object's place from its drawn region), which says what a single token shows; the language model's
read of a lone object's shape followed it where the pooled probe did not (notes/default-model.md). `--patch
--objects K` draws scenes of K objects (200-1200 px) and probes each object's own most covered patch: whether a
token shows its own object or the picture's (the shipped tower, warmed on lone objects: a lone object's shape
100 %, an object's among two 50 %; after a scene stage 85 %: notes/default-model.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Tuple

import numpy as np

PROBE_SEED_BASE = 90_000_000


def pooled_features(model, n: int, sides: Tuple[int, int] = (200, 560), hd_num: int = 24):
    """(n, 3H) pooled embeddings of n one-object pictures, their colour ids (shapes.COLOURS order), shape ids."""
    from ixc25_ms import shapes as S
    X, colour, shape = [], [], []
    for i in range(n):
        im, c, s = S.one_object_picture(PROBE_SEED_BASE + i, sides)
        e = model.encode_img(im, hd_num).asnumpy()[0]  # (N, H)
        X.append(np.concatenate([e.mean(0), e.max(0), e.min(0)]))
        colour.append(c)
        shape.append(s)
    return np.asarray(X, np.float64), np.asarray(colour), np.asarray(shape)


def patch_features(model, n: int, sides: Tuple[int, int] = (200, 560), objects: int = 1):
    """(n * objects, C) ViT output features at the patch each object covers most (the picture as
    tower_warmup.square_view shows it, the object's region from shapes.region_map), colour ids, shape ids; n
    one-object pictures, or with objects > 1 n scenes of that many objects (seeds PROBE_SEED_BASE + 10^6 x
    objects + i), their objects' rows together."""
    from mindspore import Tensor
    from ixc25_ms import shapes as S
    from ixc25_ms.train.tower_warmup import mask_view, patch_share, pixels, square_view
    side, patch = model.vit.resolution, model.vit.patch_size
    X, colour, shape = [], [], []
    for i in range(n):
        if objects == 1:
            scene, im = S.one_object_scene(PROBE_SEED_BASE + i, sides)
        else:
            rng = np.random.default_rng(PROBE_SEED_BASE + 1_000_000 * objects + i)
            scene = S.random_scene(rng, objects, sides)
            im = S.render(scene, rng)
        where = mask_view(np.asarray(S.region_map(scene, range(1, objects + 1))), side)
        f = model.vit(Tensor(pixels(square_view(im, side)[None]))).asnumpy()[0]  # (g², C)
        for k, o in enumerate(scene.objects, 1):
            X.append(f[int(patch_share(where == k, patch).argmax())])  # the patch it covers most
            colour.append(list(S.COLOURS).index(o.colour))
            shape.append(S.SHAPES.index(o.shape))
    return np.asarray(X, np.float64), np.asarray(colour), np.asarray(shape)


def ridge_accuracy(X: np.ndarray, y: np.ndarray, classes: int, n_train: int, lam: float = 10.0) -> float:
    """Fit a one-vs-all ridge classifier (standardised features + bias) on the first n_train rows; the accuracy
    of its argmax on the rest."""
    if not 0 < n_train < len(X):
        raise ValueError(f"n_train must be between 1 and {len(X) - 1}, got {n_train}")
    mu, sd = X[:n_train].mean(0), X[:n_train].std(0) + 1e-6
    Z = np.concatenate([(X - mu) / sd, np.ones((len(X), 1))], 1)
    A = Z[:n_train]
    W = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ np.eye(classes)[y[:n_train]])
    return float((np.argmax(Z[n_train:] @ W, 1) == y[n_train:]).mean())


def probe(model, n: int = 400, train_share: float = 0.75, sides=(200, 560), lam: float = 10.0,
          patch: bool = False, objects: int = 1) -> Dict[str, float]:
    """Held-out probe accuracy for colour (chance 1/6) and shape (chance 1/3): of the pooled image embeddings, or
    with `patch` of the ViT's features at the object's most covered patch (patch_features; `objects` a picture,
    fit on the first pictures' objects, scored on the rest's)."""
    from ixc25_ms import shapes as S
    if objects != 1 and not patch:
        raise ValueError("objects > 1 probes each object's own patch: it needs patch=True")
    X, colour, shape = patch_features(model, n, sides, objects) if patch else pooled_features(model, n, sides)
    k = int(round(train_share * n)) * objects
    return {"pictures": n, "objects": objects, "train": k, "colour": ridge_accuracy(X, colour, len(S.COLOURS), k, lam),
            "shape": ridge_accuracy(X, shape, len(S.SHAPES), k, lam)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="probe_default", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="checkpoint directory (repeatable; default: "
                    "the embedded default model)")
    ap.add_argument("--pictures", type=int, default=400, help="one-object pictures drawn (3/4 fit, 1/4 scored)")
    ap.add_argument("--full", action="store_true", help="pictures of 200-1200 px a side (default 200-560: one crop)")
    ap.add_argument("--patch", action="store_true", help="probe the ViT's features at the patch the object covers "
                    "most (what one token shows) instead of the pooled image embeddings")
    ap.add_argument("--objects", type=int, default=1, choices=range(1, 5), help="with --patch: scenes of this many "
                    "objects, each object's own patch probed (pictures 200-1200 px)")
    ap.add_argument("--lam", type=float, default=10.0, help="ridge penalty")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.objects > 1 and not args.patch:
        ap.error("--objects probes each object's own patch: give --patch")
    import ixc25_ms
    rows = {}
    print("| model | colour (chance 17 %) | shape (chance 33 %) |\n|---|---|---|")
    for d in args.model or [ixc25_ms.DEFAULT_MODEL]:
        model, _ = ixc25_ms.load(d, use_jit=True)
        sides = (200, 1200) if args.full or args.objects > 1 else (200, 560)
        r = probe(model, args.pictures, sides=sides, lam=args.lam, patch=args.patch, objects=args.objects)
        rows[d] = r
        print(f"| {d} | {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % |", flush=True)
    if args.json:  # written whole or not at all
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

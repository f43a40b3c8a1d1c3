"""Tower warm-up: trains a checkpoint's CLIP vision tower alone on tagged pictures (max-pooled classification).

IXC2.5 fine-tunes from a ViT that arrives trained (CLIP). A tower started from random weights and trained only
through the language-model loss learns no shape on the default model's drawn pictures: the language model reads
image tokens by attention, an average, and the averaged gradient teaches no local detector. Trained alone with
its patch features max-pooled per channel and one linear head, the same tower learns shape; an attention read
learns it off the frozen tower afterwards (notes/default-model.md). This is that first stage:

    python -m ixc25_ms.train.tower_warmup --model INIT --data tags.json --output_dir WARM --steps 500

tags.json: [{"image": "images/1.png", "tags": ["triangle"]}, ...] (paths relative to the JSON file). One tag
per picture: softmax cross-entropy over the tags seen; several: a binary cross-entropy per tag. An item may carry
"mask": a one-channel PNG of the picture's size, value k where its k-th tag lies, 0 elsewhere; `--dense W` then
adds W x a per-patch loss (every patch named by the tag covering over half of it, or background), which spreads
what the max finds over the object's patches, where an attention read (a language model's) finds it sooner
(notes/default-model.md). `--colour W` adds W x a regression of each patch's mean colour
off its features: shape tags alone wear colour out of the tower, this keeps more of it. Each picture is
scaled so its longer side is the tower's crop side and centred on white. AdamW (weight decay 0.05, betas
0.9/0.98), linear warmup then cosine; batches drawn from (seed, step), so a run killed and started again with
the same arguments resumes from its last save (`OUT.resume.safetensors`) and ends with the same weights. The
output is the input checkpoint (every file) with the vit.* tensors replaced, written under a temporary name
and renamed at the end; the head is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from PIL import Image

from ..config import ConfigError, IXCConfig
from ..processing import CLIP_MEAN, CLIP_STD
from ..vision.clip import CLIPVisionTower
from ..weights import CheckpointError
from ..weights.layout import load_state_dict
from ..weights.safetensors import write_safetensors
from .args import above_zero, count, numbers_as_values, positive, share
from .optim import Optimizer, lr_lambda

PREFIX = "vit."  # the tower's tensors in an IXC2.5 checkpoint: vit.vision_tower.vision_model....


class TagDataError(ValueError):
    """Bad tag data: the message names the file, the item and the field."""


def _unreadable(path: str) -> Optional[str]:
    """Why PIL cannot open the picture at `path` (its header only: a file that is no picture), or None."""
    try:
        with Image.open(path) as im:
            im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"not a readable picture ({type(e).__name__})"
    return None


def read_tags(path: str) -> Tuple[List[str], List[List[str]], List[str], List[Optional[str]]]:
    """(image paths, tags per picture, the sorted tag vocabulary, mask paths or None) of a tags.json."""
    try:
        with open(path) as f:
            items = json.load(f)
    except OSError as e:
        raise TagDataError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise TagDataError(f"{path}: not JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise TagDataError(f"{path}: expected a non-empty list of {{'image', 'tags'}} items")
    root, images, tags, masks = os.path.dirname(os.path.abspath(path)), [], [], []
    for i, it in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(it, dict) or not isinstance(it.get("image"), str):
            raise TagDataError(f"{where}: field 'image' must be a path")
        t = it.get("tags")
        if not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
            raise TagDataError(f"{where}: field 'tags' must be a non-empty list of strings")
        full = os.path.join(root, it["image"])
        if not os.path.isfile(full):
            raise TagDataError(f"{where}: field 'image': no file {it['image']!r}")
        why = _unreadable(full)
        if why:
            raise TagDataError(f"{where}: field 'image': {it['image']!r}: {why}")
        m = it.get("mask")
        if m is not None:
            if not isinstance(m, str) or not os.path.isfile(os.path.join(root, m)):
                raise TagDataError(f"{where}: field 'mask': no file {m!r}")
            m, name = os.path.join(root, m), m
            why = _unreadable(m)
            if why:
                raise TagDataError(f"{where}: field 'mask': {name!r}: {why}")
        images.append(full)
        tags.append(t)
        masks.append(m)
    return images, tags, sorted({x for t in tags for x in t}), masks


def fit(im: Image.Image, side: int, resample) -> Image.Image:
    """im scaled so its longer side is `side`."""
    s = side / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), resample=resample)


def _centred(im: Image.Image, side: int, resample, fill) -> np.ndarray:
    """im scaled so its longer side is `side` (fit) and centred on a `side` square of `fill` (im's mode)."""
    im = fit(im, side, resample)
    canvas = Image.new(im.mode, (side, side), fill)
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return np.asarray(canvas, np.uint8)


def square_view(picture, side: int) -> np.ndarray:
    """(side, side, 3) uint8: the picture (a path or a PIL image) scaled (bicubic) so its longer side is `side`,
    centred on white."""
    with (Image.open(picture) if isinstance(picture, str) else picture.copy()) as im:
        return _centred(im.convert("RGB"), side, Image.BICUBIC, (255, 255, 255))


def mask_view(mask: np.ndarray, side: int) -> np.ndarray:
    """(side, side) uint8: a one-channel (H, W) mask scaled (nearest) and centred as square_view places its
    picture; 0 around it."""
    return _centred(Image.fromarray(mask.astype(np.uint8)), side, Image.NEAREST, 0)


def patch_share(a: np.ndarray, patch: int) -> np.ndarray:
    """(..., H, W) mask -> (..., grid²) float: the share of each patch's pixels that are set (row-major patches,
    as the tower orders its tokens); rows and columns past the last whole patch are dropped."""
    h, w = a.shape[-2] // patch, a.shape[-1] // patch
    a = np.asarray(a, np.float64)[..., : h * patch, : w * patch]
    return a.reshape(a.shape[:-2] + (h, patch, w, patch)).mean((-3, -1)).reshape(a.shape[:-2] + (h * w,))


def patch_labels(images: List[str], masks: List[Optional[str]], tags: List[List[str]], vocab: List[str], side: int,
                 patch: int, data: str = "") -> np.ndarray:
    """(N, grid²) int32: each patch of each picture's square view labelled with the vocabulary index of the tag
    whose mask region covers over half of it, else len(vocab) (the background class). Each mask is checked
    against its picture's size and tags."""
    g, out = side // patch, []
    for i, (p, m, t) in enumerate(zip(images, masks, tags)):
        where = f"{data}: item {i}: field 'mask'"
        if m is None:
            raise TagDataError(f"{where} is needed for the per-patch loss (--dense)")
        with Image.open(p) as im, Image.open(m) as mk:
            if im.size != mk.size:
                raise TagDataError(f"{where}: {mk.size[0]}x{mk.size[1]}, the image is {im.size[0]}x{im.size[1]}")
            a = np.asarray(mk)
        if a.ndim != 2:
            raise TagDataError(f"{where}: a mask has one channel (0 background, k the item's k-th tag), this one "
                               f"{a.shape}")
        v = mask_view(a, side)[: g * patch, : g * patch]
        if int(v.max()) > len(t):
            raise TagDataError(f"{where}: value {int(v.max())}, the item has {len(t)} tags")
        row = np.full(g * g, len(vocab), np.int32)
        for k, tag in enumerate(t, 1):
            row[patch_share(v == k, patch) > 0.5] = vocab.index(tag)
        out.append(row)
    return np.stack(out)


def pixels(views: np.ndarray) -> np.ndarray:
    """(B, R, R, 3) uint8 -> (B, 3, R, R) float32: /255 then CLIP mean/std (processing.to_pixel_values)."""
    x = (views.astype(np.float32) / np.float32(255.0) - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class WarmupNet(nn.Cell):
    """Tower -> per-channel max over patches -> linear head -> loss. (B,3,R,R) pixels and (B, n_tags) float
    targets (one-hot for single-tag data) -> the mean loss: softmax CE when `single`, else BCE per tag.
    dense > 0 adds dense x a per-patch loss: every patch's features classified by a second linear head as the tag
    whose region holds it or the background ((B, grid²) int labels, len(tags) = background), softmax CE averaged
    over the object patches and over the background patches, half the weight each. colour > 0 adds colour x a
    per-patch regression: a third linear head maps every patch's features to the patch's mean normalised RGB
    (mean squared error), which keeps colour readable off each token while the tags teach shape."""

    def __init__(self, vision_cfg, n_tags: int, single: bool, seed: int = 0, dense: float = 0.0,
                 colour: float = 0.0):
        super().__init__()
        self.tower = CLIPVisionTower(vision_cfg)
        c = vision_cfg.hidden_size
        rng = np.random.default_rng(seed)
        self.head_w = ms.Parameter(Tensor((rng.standard_normal((n_tags, c)) * 0.02).astype(np.float32)),
                                   name="head.weight")
        self.head_b = ms.Parameter(Tensor(np.zeros(n_tags, np.float32)), name="head.bias")
        self.single, self.dense, self.n_tags = single, float(dense), n_tags
        if self.dense:
            self.dense_w = ms.Parameter(Tensor((rng.standard_normal((n_tags + 1, c)) * 0.02).astype(np.float32)),
                                        name="dense.weight")
            self.dense_b = ms.Parameter(Tensor(np.zeros(n_tags + 1, np.float32)), name="dense.bias")
        self.colour, self.patch = float(colour), vision_cfg.patch_size
        if self.colour:
            self.colour_w = ms.Parameter(Tensor((rng.standard_normal((3, c)) * 0.02).astype(np.float32)),
                                         name="colour.weight")
            self.colour_b = ms.Parameter(Tensor(np.zeros(3, np.float32)), name="colour.bias")

    def heads(self):
        return [self.head_w, self.head_b] + ([self.dense_w, self.dense_b] if self.dense else []) + (
            [self.colour_w, self.colour_b] if self.colour else [])

    def logits(self, px):
        f = self.tower(px).max(axis=1)  # (B, C)
        return ops.matmul(f, self.head_w.T) + self.head_b

    def construct(self, px, target, labels):
        f = self.tower(px)  # (B, P, C)
        z = ops.matmul(f.max(axis=1), self.head_w.T) + self.head_b
        if self.single:
            loss = -(target * ops.log_softmax(z, -1)).sum(-1).mean()
        else:
            loss = ops.binary_cross_entropy_with_logits(z, target, ops.ones_like(z), ops.ones_like(z))
        if self.dense:
            logp = ops.log_softmax(ops.matmul(f, self.dense_w.T) + self.dense_b, -1)  # (B, P, n_tags + 1)
            per = -ops.gather_elements(logp, 2, labels.expand_dims(-1)).squeeze(-1)  # (B, P)
            on = (labels < self.n_tags).astype(per.dtype)
            off = 1 - on
            one = ops.ones((), per.dtype)
            part = 0.5 * (per * on).sum() / ops.maximum(on.sum(), one) + \
                0.5 * (per * off).sum() / ops.maximum(off.sum(), one)
            loss = loss + self.dense * part
        if self.colour:  # (B, 3, R, R) -> each patch's mean RGB (B, P, 3), patches in the tower's row-major order
            b, _, r, _ = px.shape
            g = r // self.patch
            rgb = px.reshape(b, 3, g, self.patch, g, self.patch).mean((3, 5)).reshape(b, 3, g * g).transpose(0, 2, 1)
            loss = loss + self.colour * ((ops.matmul(f, self.colour_w.T) + self.colour_b - rgb) ** 2).mean()
        return loss


def targets(tags: List[List[str]], vocab: List[str]) -> np.ndarray:
    out = np.zeros((len(tags), len(vocab)), np.float32)
    index = {t: i for i, t in enumerate(vocab)}
    for r, t in enumerate(tags):
        out[r, [index[x] for x in t]] = 1.0
    return out


def batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The pictures of step `step` (1-based): drawn from (seed, step) alone, so a resumed run draws the same."""
    return np.random.default_rng([seed, step]).integers(0, n, batch)


def _write_checkpoint(src: str, dst: str, tower_state: dict) -> None:
    """src's files copied to dst with the vit.* tensors replaced; written to dst.tmp, renamed at the end."""
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "optimizer*",
                                                            "trainer_state.json"))
    state = load_state_dict(src)
    state.update(tower_state)
    write_safetensors(os.path.join(tmp, "model.safetensors"), {k: ("F32", v) for k, v in state.items()})
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def accuracy(net: WarmupNet, data: str, vocab: List[str], side: int, batch: int = 16) -> float:
    """Share of `data`'s pictures whose tags the head gets exactly: the top tag (one a picture) or every tag with
    a positive logit and no other (several); tags outside the training vocabulary count as wrong."""
    images, tags, _, _ = read_tags(data)
    right = 0
    for a in range(0, len(images), batch):
        px = pixels(np.stack([square_view(p, side) for p in images[a:a + batch]]))
        z = net.logits(Tensor(px)).asnumpy()
        for row, t in zip(z, tags[a:a + batch]):
            got = {vocab[int(row.argmax())]} if net.single else {vocab[i] for i in np.flatnonzero(row > 0)}
            right += got == set(t)
    return right / len(images)


def warm_up(model: str, data: str, output_dir: str, steps: int = 500, batch: int = 16, lr: float = 1e-3,
            warmup: int = 50, weight_decay: float = 0.05, seed: int = 0, save_steps: int = 100,
            use_jit: bool = True, eval_data: str = "", dense: float = 0.0, head_steps: int = 0,
            colour: float = 0.0, log=print) -> List[dict]:
    """Train `model`'s tower on `data` (tags.json) and write `output_dir`; returns the logged rows
    ({step, loss, seconds} every 50 steps and the last; with `eval_data`, the last has the held-out accuracy).
    dense > 0: add dense x the per-patch loss (WarmupNet), labels from each item's mask (patch_labels).
    colour > 0: add colour x the per-patch colour regression (WarmupNet).
    head_steps: the first steps train the fresh heads only, the tower held, then everything (meant to spare
    a trained tower a random head's first gradients; it did not keep shape while colour was added: notes/)."""
    images, tags, vocab, masks = read_tags(data)
    with open(os.path.join(model, "config.json")) as f:
        cfg = IXCConfig.from_dict(json.load(f), where=os.path.join(model, "config.json")).vision
    single = all(len(t) == 1 for t in tags)
    y = targets(tags, vocab)
    grid = cfg.image_size // cfg.patch_size
    labels = patch_labels(images, masks, tags, vocab, cfg.image_size, cfg.patch_size, data) if dense else \
        np.zeros((len(images), grid * grid), np.int32)  # unused without the per-patch loss
    net = WarmupNet(cfg, len(vocab), single, seed, dense, colour)
    tower = {PREFIX + p.name[len("tower."):]: p for p in net.tower.get_parameters()}  # tower.vision_tower... -> vit.vision_tower...
    state = load_state_dict(model)
    for k, p in tower.items():
        if k not in state:
            raise SystemExit(f"{model}: no tensor {k} (is it an IXC2.5 checkpoint with this vision_config?)")
        p.set_data(Tensor(state[k]))
    used = [k for k in tower if ".post_layernorm." not in k]  # held for the checkpoint, unused (as in chat)
    params = [tower[k] for k in used] + net.heads()
    names = used + [p.name for p in net.heads()]
    opt = Optimizer(params, names, "adamw_torch", weight_decay, (0.9, 0.98))
    resume, start, rows = output_dir.rstrip("/") + ".resume.safetensors", 0, []
    if os.path.exists(resume):
        saved = load_state_dict(resume)
        for n, p in zip(names, params):
            p.set_data(Tensor(saved[n]))
        opt.load_state_arrays({k[4:]: v for k, v in saved.items() if k.startswith("opt.")})
        start = int(saved["opt.steps"][0])
        log(f"[tower_warmup] resuming at step {start} from {resume}")
    grad = ms.value_and_grad(net, None, params)
    step_fn = ms.jit(grad) if use_jit else grad
    log(f"[tower_warmup] {len(images)} pictures, {len(vocab)} tags ({'one' if single else 'several'} a picture), "
        f"tower {cfg.hidden_size} x {cfg.num_hidden_layers}; {steps} steps of {batch}"
        + (f"; per-patch loss x {dense}" if dense else "") + (f"; per-patch colour x {colour}" if colour else "")
        + (f"; heads alone for {head_steps}" if head_steps else ""))

    def view(i):  # a picture whose header read but whose pixels do not (truncated): named, as read_tags does
        try:
            return square_view(images[i], cfg.image_size)
        except (OSError, ValueError) as e:
            raise TagDataError(f"{data}: item {i}: field 'image': {images[i]!r}: cannot decode ({e})") from None

    def load(step):  # this step's picture indices and pixels
        idx = batch_indices(len(images), batch, seed, step)
        return idx, pixels(np.stack([view(i) for i in idx]))

    pool = ThreadPoolExecutor(1, thread_name_prefix="warmup-data")  # decodes step + 1 while step runs
    ahead = pool.submit(load, start + 1)
    t0 = time.perf_counter()
    for step in range(start + 1, steps + 1):
        idx, px = ahead.result()
        if step < steps:
            ahead = pool.submit(load, step + 1)
        loss, grads = step_fn(Tensor(px), Tensor(y[idx]), Tensor(labels[idx]))
        heads_only = step <= head_steps
        opt.step(grads, lr * lr_lambda("cosine", step - 1, warmup, steps),
                 [not heads_only] * len(used) + [True] * len(net.heads()))
        if step % 50 == 0 or step == steps:
            rows.append({"step": step, "loss": round(float(loss.asnumpy()), 4),
                         "seconds": round(time.perf_counter() - t0)})
            log(f"[tower_warmup] {json.dumps(rows[-1])}")
        if step % save_steps == 0 and step < steps:
            saved = {n: ("F32", p.asnumpy()) for n, p in zip(names, params)}
            saved.update({"opt." + k: ("F32" if v.dtype != np.int64 else "I64", v) for k, v in
                          opt.state_arrays().items()})
            write_safetensors(resume + ".tmp", saved)
            os.replace(resume + ".tmp", resume)
    pool.shutdown(wait=True)
    if eval_data:
        rows[-1]["accuracy"] = round(accuracy(net, eval_data, vocab, cfg.image_size), 4)
        log(f"[tower_warmup] held-out {eval_data}: {rows[-1]['accuracy']:.1%} right")
    _write_checkpoint(model, output_dir, {k: p.asnumpy() for k, p in tower.items()})
    if os.path.exists(resume):
        os.remove(resume)
    return rows


def main(argv=None) -> int:
    ap = numbers_as_values(argparse.ArgumentParser(prog="ixc25-tower-warmup", description=__doc__.split("\n")[0]))
    ap.add_argument("--model", required=True, help="IXC2.5 checkpoint directory (official layout)")
    ap.add_argument("--data", required=True, help="tags.json: [{'image': path, 'tags': [tag, ...], 'mask': optional path}, ...]")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--steps", type=positive, default=500)
    ap.add_argument("--batch", type=positive, default=16)
    ap.add_argument("--lr", type=above_zero, default=1e-3)
    ap.add_argument("--warmup", type=count, default=50)
    ap.add_argument("--weight_decay", type=share, default=0.05)
    ap.add_argument("--save_steps", type=positive, default=100, help="resume point every N steps")
    ap.add_argument("--head_steps", type=count, default=0, help="the first N steps train the heads only, the tower held")
    ap.add_argument("--eval_data", default="", help="held-out tags.json scored at the end")
    ap.add_argument("--dense", type=share, default=0.0, help="add this weight x a per-patch loss (every patch "
                    "classified as the tag whose region holds it, or background); needs a 'mask' in every item")
    ap.add_argument("--colour", type=share, default=0.0, help="add this weight x a per-patch regression of each "
                    "patch's mean colour off its features (keeps colour readable while the tags teach shape)")
    ap.add_argument("--seed", type=count, default=0)
    ap.add_argument("--no_jit", action="store_true", help="run the step eagerly (PyNative)")
    a = ap.parse_args(argv)
    try:
        warm_up(a.model, a.data, a.output_dir, a.steps, a.batch, a.lr, a.warmup, a.weight_decay, a.seed,
                a.save_steps, not a.no_jit, a.eval_data, a.dense, a.head_steps, a.colour)
    except (TagDataError, CheckpointError, ConfigError, OSError, ValueError) as e:  # as ixc25-finetune: one line
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        print(f"ixc25-tower-warmup: {where}{' '.join(msg.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

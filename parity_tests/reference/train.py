"""Our own PyTorch reference of one official IXC2.5 fine-tuning step: forward with autograd, loss, gradients."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from parity_tests.reference import train_data as D
from parity_tests.reference.language import RefLM
from parity_tests.reference.vision import VisionReference

LLM_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
VIT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")
VIT = "vit.vision_tower.vision_model."
VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")


class TrainRefError(ValueError):
    """Inputs of the training reference are inconsistent (weights, flags or items)."""


@dataclass
class TrainFlags:
    """Flags of official finetune.py (defaults as its dataclasses) plus ours (use_backbone_lora, freeze_llm)."""

    hd_num: int = 18
    max_length: int = 8192
    fix_vit: bool = True  # False: the ViT trains, its post_layernorm removed
    fix_sampler: bool = False  # True: vision_proj frozen
    use_lora: bool = False  # PEFT LoRA on the LLM linears; see trainable_names
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05  # PEFT LoRA dropout (also used by the backbone LoRA)
    lora_target_modules: Tuple[str, ...] = LLM_LINEARS
    use_backbone_lora: int = 0  # rank R > 0: LoRA (alpha 2R) on the ViT linears, the rest of the ViT frozen
    freeze_llm: bool = False  # model.* and output.weight frozen (adapters follow their own flags)
    plora_dropout: float = 0.05  # dropout in front of the partial (image-token) LoRA, active in training


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name  # not Plora_A / lora_sft_A: those need a dot before


def trainable_names(names: Sequence[str], flags: TrainFlags) -> List[str]:
    """The trainable subset of `names`, in order, as official finetune.py leaves requires_grad.

    fix_vit False trains the ViT except post_layernorm (replaced by Identity); fix_vit True freezes it.
    fix_sampler freezes vision_proj. use_lora first freezes all of model.model (embeddings, layers with their
    partial LoRAs, norm), then PEFT's get_peft_model freezes every parameter whose name lacks 'lora_'
    (LoraModel._mark_only_adapters_as_trainable, peft 0.8.2), so with use_lora only the PEFT adapters train:
    output.weight, plora_*_GN, vision_proj and the ViT are frozen too (Plora_*/lora_sft_* contain 'lora_' but
    were frozen by the first step). Ours: use_backbone_lora trains the ViT LoRA and freezes the other ViT
    weights; freeze_llm freezes model.* and output.weight."""
    out = []
    for n in names:
        if n.startswith("vit.") and _is_lora(n):
            t = flags.use_backbone_lora > 0
        elif n.startswith("model.") and _is_lora(n):
            t = flags.use_lora
        elif flags.use_lora:
            t = False
        elif n.startswith("vit."):
            t = not flags.fix_vit and flags.use_backbone_lora <= 0 and ".post_layernorm." not in n
        elif n.startswith("vision_proj."):
            t = not flags.fix_sampler
        elif n.startswith("model.") or n.startswith("output."):
            t = not flags.freeze_llm
        else:  # plora_glb_GN, plora_sub_GN (and anything else the model holds): requires_grad by default
            t = True
        if t:
            out.append(n)
    return out


def _lora_pairs(weights, modules: Sequence[str], rank: int, what: str) -> Dict[str, Tuple[str, str]]:
    """module -> (lora_A key, lora_B key), checked present with shapes (rank, in) and (out, rank)."""
    pairs = {}
    for m in modules:
        a, b, base = m + ".lora_A.weight", m + ".lora_B.weight", m + ".weight"
        for k in (a, b):
            if k not in weights:
                raise TrainRefError(f"{what}: weight '{k}' is missing")
        out_f, in_f = np.shape(weights[base])
        if tuple(np.shape(weights[a])) != (rank, in_f) or tuple(np.shape(weights[b])) != (out_f, rank):
            raise TrainRefError(f"{what}: '{a}' {np.shape(weights[a])} / '{b}' {np.shape(weights[b])} do not "
                                f"fit rank {rank} and base {(out_f, in_f)}")
        pairs[m] = (a, b)
    return pairs


def _dropout(x, p):
    return F.dropout(x, p, training=True) if p > 0 else x


class TrainLM(RefLM):
    """RefLM with the training PLoRA (image rows, dropout) and PEFT LoRA on all tokens."""

    def __init__(self, cfg, weights, flags: TrainFlags):
        super().__init__(cfg, weights)
        self.flags = flags
        self.peft = {}
        if flags.use_lora:
            mods = [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LLM_LINEARS]
            for t in flags.lora_target_modules:
                if not any(m == t or m.endswith("." + t) for m in mods):
                    raise TrainRefError(f"lora_target_modules: '{t}' matches no decoder linear {LLM_LINEARS}")
            hit = [m for m in mods if any(m == t or m.endswith("." + t) for t in flags.lora_target_modules)]
            self.peft = _lora_pairs(weights, hit, flags.lora_r, "use_lora")
            self.peft_scale = flags.lora_alpha / flags.lora_r

    def plora(self, name, x, im_mask, mode):
        """Official PLoRA in train mode: res = base(x) (+ mode LoRAs); res[im] += B(A(dropout(x[im]))) * s;
        with no image row it adds B(A(dropout(x[:1]))) * 0 to row 0 (Plora stays in the graph, zero grads).
        A PEFT LoRA on this module adds lora_B(lora_A(dropout(x))) * alpha/r on every token."""
        b, n, c = x.shape
        y = self.modal_linear(name, x, mode)
        flat_x, flat = x.reshape(b * n, c), y.reshape(b * n, -1)
        idx = im_mask.reshape(-1).nonzero()[:, 0]
        if idx.numel():
            delta = self.image_lora(name, _dropout(flat_x[idx], self.flags.plora_dropout)) * self.cfg.lora_scaling
        else:
            idx = torch.zeros(1, dtype=torch.long)
            delta = self.image_lora(name, _dropout(flat_x[:1], self.flags.plora_dropout)) * 0
        y = flat.index_add(0, idx, delta).reshape(b, n, -1)
        if name in self.peft:
            a, bk = self.peft[name]
            y = y + (_dropout(x, self.flags.lora_dropout) @ self.w[a].T) @ self.w[bk].T * self.peft_scale
        return y


class TrainVision(VisionReference):
    """VisionReference with optional backbone LoRA on the encoder linears, over a list of images."""

    def __init__(self, cfg, weights, flags: TrainFlags):
        super().__init__({k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)}, cfg.vision)
        self.flags = flags
        self.lora = {}
        r = flags.use_backbone_lora
        if r > 0:
            mods = [f"{VIT}encoder.layers.{i}.{m}" for i in range(self.layers) for m in VIT_LINEARS]
            self.lora = _lora_pairs(weights, mods, r, "use_backbone_lora")
            self.lora_scale = 2.0  # InternVL's --use_backbone_lora R: rank R, alpha 2R

    def _lin(self, x, name):
        y = super()._lin(x, name)
        if name in self.lora:
            a, b = self.lora[name]
            y = y + (_dropout(x, self.flags.lora_dropout) @ self.w[a].T) @ self.w[b].T * self.lora_scale
        return y

    def encode_list(self, pixels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Official vit(list) + vision_proj: every image's views in one tower batch ([global, crops] per
        image), per-image GN layout (own h x w grid), concatenated, projected; returns (N_k, hidden) each."""
        views, grids = [], []
        for pv in pixels:
            v, h, w = self.views(pv)
            views.append(v)
            grids.append((h, w))
        feats = self.tower(torch.cat(views, 0))
        lays, at = [], 0
        for h, w in grids:
            lays.append(self.layout(feats[at:at + 1 + h * w], h, w)[0])
            at += 1 + h * w
        emb = self.project(torch.cat(lays, 0))
        return list(torch.split(emb, [t.shape[0] for t in lays], 0))


def _load_images(paths, image_root, where, flags) -> List[torch.Tensor]:
    out = []
    for p in paths:
        full = os.path.join(image_root, p)
        try:
            with Image.open(full) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise TrainRefError(f"{where}: field 'image': cannot open {full} ({e})") from None
        out.append(D.train_transform(im, flags.hd_num))
    return out


def ref_loss(lm: "TrainLM", vis, tokenizer, items: Sequence[dict], image_root: str, flags: TrainFlags):
    """The official training loss of one micro-batch, with autograd on whatever `lm.w` / `vis.w` tensors require
    grad -> (loss, batch dict of int64 (B, L) tensors). `vis` None for a text-only micro-batch."""
    if not items:
        raise TrainRefError("items: empty micro-batch")
    parsed = [D.item_text_and_images(it, f"items[{k}]") for k, it in enumerate(items)]
    with_img = [p[1] is not None for p in parsed]
    if any(with_img) and not all(with_img):
        raise TrainRefError("items: a micro-batch mixes items with and without 'image' (the official datasets "
                            "are one kind per file)")
    _, _, _, pad = D.special_ids(tokenizer)
    tok = lm.w["model.tok_embeddings.weight"]
    if vis is not None:
        pixels = [_load_images(p[1], image_root, f"items[{k}]", flags) for k, p in enumerate(parsed)]
        samples = [D.wrap_sample(text, [D.image_token_count(t.shape) for t in px], tokenizer, flags.max_length)
                   for (text, _), px in zip(parsed, pixels)]
        batch = D.pad_image_batch(samples, pad, flags.max_length)
        img = vis.encode_list([t for px in pixels for t in px])
        rows, first = [], 0
        for s, px in zip(samples, pixels):
            segs = [tok[torch.tensor(v)] if kind == "text" else img[first + v] for kind, v in s.segments]
            first += len(px)
            e = torch.cat(segs, 0)
            L = batch["input_ids"].shape[1]
            if e.shape[0] < L:  # official: the pad token's embedding
                e = torch.cat([e, tok[torch.full((L - e.shape[0],), pad)]], 0)
            rows.append(e[:L])
        embeds = torch.stack(rows, 0)
    else:
        batch = D.text_batch([p[0] for p in parsed], tokenizer, flags.max_length)
        embeds = tok[batch["input_ids"]]

    b, L = batch["input_ids"].shape
    pos = torch.arange(L)[None].expand(b, L)  # official training: position ids 0..L-1, whatever the padding
    _, h, _ = lm.run(embeds, batch["im_mask"].bool(), batch["attention_mask"], "base", None, pos, head=False)
    shift = batch["labels"][:, 1:]
    sel = shift != D.IGNORE
    # logits only where a target is trained: the other rows add exactly nothing to the mean loss or any gradient
    logits = (h[:, :-1][sel] @ lm.w["output.weight"].T).float()
    loss = F.cross_entropy(logits, shift[sel])
    return loss, batch


def ref_train_step(cfg, weights: Dict[str, np.ndarray], tokenizer, items: Sequence[dict], image_root: str,
                   flags: TrainFlags) -> dict:
    """One official fine-tuning forward/backward on one micro-batch of official JSON items (all with images
    or all without, as the official per-file datasets are). `items` are the conversations that reach
    model(samples=...): for image data the --batch_size items Sample_dataset.get_item draws; for text data
    the official collator keeps only the first text of each per-device instance, so a text micro-batch has
    per_device_train_batch_size items. Image paths are joined to `image_root` (the official opens them
    relative to its working directory). Weights: official names (+ PEFT-like '<module>.lora_A.weight' /
    '.lora_B.weight' for the LoRAs), fp32. infer_mode is 'base' (as training). Dropouts (flags.plora_dropout,
    flags.lora_dropout) draw from torch's global generator.

    Returns dict(input_ids, labels, attention_mask, im_mask: int64 (B, L) numpy (input_ids: -100 at image
    positions, pad id at padding), loss: float, grads: {trainable name: float32 ndarray, or None when the
    tensor is not in the graph}, trainable: [names])."""
    if not items:
        raise TrainRefError("items: empty micro-batch")
    parsed = [D.item_text_and_images(it, f"items[{k}]") for k, it in enumerate(items)]
    with_img = [p[1] is not None for p in parsed]
    trainable = trainable_names(list(weights), flags)
    lm = TrainLM(cfg, weights, flags)
    vis = TrainVision(cfg, weights, flags) if all(with_img) else None
    params = {}
    for n in trainable:
        t = lm.w.get(n) if n in lm.w else (vis.w.get(n) if vis is not None else None)
        if t is not None:
            params[n] = t.requires_grad_(True)

    loss, batch = ref_loss(lm, vis, tokenizer, items, image_root, flags)
    names = list(params)
    got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True) if names else []
    grads = {n: None for n in trainable}
    grads.update({n: (None if g is None else g.detach().numpy().copy()) for n, g in zip(names, got)})
    return {k: batch[k].numpy() for k in ("input_ids", "labels", "attention_mask", "im_mask")} | {
        "loss": float(loss.detach()), "grads": grads, "trainable": trainable}

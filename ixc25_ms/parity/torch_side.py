"""The PyTorch side of the parity tool: our reference (parity_tests.reference) on the MindSpore side's inputs."""
from __future__ import annotations

import gc
import os
import time
from typing import List, Mapping, Optional, Sequence

import numpy as np

from .inputs import canvas
from .lazy import LazyWeights

VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")


def _vision_rows(vref, image, hd_num: int, prefix: str, emit):
    """One image through the reference vision path, each row handed to `emit`; -> image embeddings."""
    from parity_tests.reference.vision import normalize_rgb
    pv = normalize_rgb(np.array(canvas(image, hd_num, vref.crop)))
    emit(prefix + "pixel_values", pv)
    views, hh, ww = vref.views(pv, vref.crop)
    emit(prefix + "vit.views", views)
    feats = None
    for name, x in vref.tower_rows(views):
        if name == "features":
            feats = x
        else:
            emit(f"{prefix}vit.{name}", x)
    del views, pv
    lay = vref.layout(feats, hh, ww)
    emit(prefix + "vit_out_with_GN", lay)
    emb = vref.project(lay)
    emit(prefix + "img_embeds", emb)
    return emb


def run_reference(model_dir: str, store, emit, ref_dtype: str = "fp32", images: Sequence = (),
                  infer_mode: str = "base", weights: Optional[Mapping] = None, log=print) -> List[int]:
    """Runs our PyTorch reference on the same inputs (token ids, image slots, greedy prefix from the
    MindSpore run) and hands every output to `emit`. Returns the reference greedy ids."""
    import torch
    import torch.nn.functional as F

    from parity_tests.reference.language import RefLM, rms_norm
    from parity_tests.reference.towers import vision_reference

    from ..config import IXCConfig

    tdt = {"fp32": torch.float32, "fp16": torch.float16}[ref_dtype]
    cfg = IXCConfig.from_file(model_dir)
    state = weights if weights is not None else LazyWeights(model_dir)
    segs = store.meta["segments"]
    l = int(store.meta["seq_len"])
    im_mask = torch.from_numpy(np.load(os.path.join(store.root, "im_mask.npy")))
    t0 = time.perf_counter()
    img_embeds = {}
    with torch.inference_mode():
        if any(s["kind"] == "image" for s in segs):
            vstate = state.only(VISION_PREFIXES) if hasattr(state, "only") else \
                {k: v for k, v in state.items() if k.startswith(VISION_PREFIXES)}
            vref = vision_reference(vstate, cfg.vision, tdt)
            del vstate
            for s in segs:
                if s["kind"] == "image":
                    i = s["index"]
                    img_embeds[i] = _vision_rows(vref, images[i], s["hd_num"], f"image{i}.", emit)
            del vref
            gc.collect()
        t_vis = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = RefLM(cfg, state, tdt)
        del state
        gc.collect()
        parts = [ref.embed(torch.tensor([s["ids"]])) if s["kind"] == "text" else img_embeds[s["index"]].to(tdt)
                 for s in segs]
        h = torch.cat(parts, 1)[:, :l]
        del parts, img_embeds
        emit("llm.inputs_embeds", h)
        pos = torch.arange(l)[None]
        cos, sin = ref.rope(pos, l)
        allowed = torch.ones(l, l, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, l, l).masked_fill(~allowed, torch.finfo(torch.float32).min)
        im = im_mask if bool(im_mask.any()) else None
        eps, w = cfg.rms_norm_eps, ref.w
        past = []
        for j in range(cfg.num_hidden_layers):
            a, kv = ref.attention(j, rms_norm(h, w[f"model.layers.{j}.attention_norm.weight"], eps), im, cos, sin,
                                  mask, None, infer_mode)
            past.append(kv)
            emit(f"llm.layers.{j}.attention", a)
            h = h + a
            x = rms_norm(h, w[f"model.layers.{j}.ffn_norm.weight"], eps)
            q = f"model.layers.{j}.feed_forward."
            g = F.silu(ref.plora(q + "w1", x, im, infer_mode)) * ref.plora(q + "w3", x, im, infer_mode)
            f = ref.plora(q + "w2", g, im, infer_mode)
            emit(f"llm.layers.{j}.mlp", f)
            h = h + f
            emit(f"llm.layers.{j}", h)
            del a, x, f, g
        h = rms_norm(h, w["model.norm.weight"], eps)
        emit("llm.norm", h)
        logits = (h @ w["output.weight"].T).float()
        emit("llm.logits", logits)
        last = logits[:, -1]
        del logits, h
        t_lm = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_ids = store.meta["greedy_ids"]
        ids = []
        for k in range(len(ours_ids)):
            if k > 0:  # teacher-forced on the MindSpore ids, so every step's logits are comparable
                emb = ref.embed(torch.tensor([[ours_ids[k - 1]]]))
                step, _, past = ref.forward(emb, None, torch.ones(1, l + k, dtype=torch.long), infer_mode, past)
                emit(f"generate.step{k}.logits", step)
                last = step[:, -1]
            ids.append(int(last[0].argmax()))
            top2 = torch.topk(last[0].float(), 2).values
            store.meta.setdefault("ref_margins", []).append(float(top2[0] - top2[1]))
    store.meta["timings"].update(ref_vision_s=t_vis, ref_layers_s=t_lm, ref_generate_s=time.perf_counter() - t0)
    return ids

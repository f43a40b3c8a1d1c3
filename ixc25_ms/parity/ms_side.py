"""The MindSpore side of the parity tool: the model's own code paths, every row captured and saved to disk."""
from __future__ import annotations

import gc
import os
import time
from typing import List, Mapping, Optional, Sequence

import numpy as np

from ..testing.memory import peak_rss_mb
from .hooks import capture, llm_taps, tower_taps
from .inputs import canvas, is_video
from .lazy import LazyWeights

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


def build_ms_model(model_dir: str, dtype: str, use_jit: bool, weights: Optional[Mapping] = None):
    """As ixc25_ms.model.load, but filling parameters from a lazy mapping (one checkpoint tensor in memory
    at a time on top of the model)."""
    from ..config import IXCConfig
    from ..weights.loader import assign_state_dict
    from ..model import InternLMXComposer2ForCausalLM
    from ..tokenizer import InternLM2Tokenizer
    cfg = IXCConfig.from_file(model_dir)
    tok = InternLM2Tokenizer.from_pretrained(model_dir)
    state = weights if weights is not None else LazyWeights(model_dir)
    model = InternLMXComposer2ForCausalLM(cfg, dtype=dtype, use_jit=use_jit)
    assign_state_dict(model, state, model_dir)
    model.tokenizer = tok
    return model, tok


def encode_with_rows(model, image, hd_num: int, prefix: str, save) -> object:
    """One image (or video) -> image embeddings through the model's own path, saving `prefix` + pixel_values,
    vit.views, the tower rows (forward hooks), vit_out_with_GN and img_embeds.

    PyNative: the hooks fire inside encode_pixels. Graph mode (model.use_jit): the tower first runs once eagerly
    with the hooks (a jit graph runs no Python hooks), then encode_pixels runs the compiled forward."""
    from mindspore import Tensor

    from ..dtypes import np_dtype
    from ..processing import preprocess_image, to_pixel_values
    from ..vision import encode_pixels, split_views
    vit = model.vit
    geom = vit.geometry
    if is_video(image):
        pv = to_pixel_values(canvas(image, hd_num, geom.resolution, model.font_path))
    else:
        pv = preprocess_image(image, hd_num=hd_num, crop=geom.resolution)
    save(prefix + "pixel_values", pv)
    views = split_views(pv, geom)
    save(prefix + "vit.views", views)
    taps = [(prefix + name, cell, where) for name, cell, where in tower_taps(vit)]
    args = (vit, model.vision_proj, model.plora_glb_GN, model.plora_sub_GN, pv)
    if model.use_jit:  # the rows from one eager pass of the tower, then the compiled path
        with capture(taps, save):
            vit(Tensor(views.astype(np_dtype(vit.compute_dtype))))
        emb, layout = encode_pixels(*args, use_jit=True, return_layout=True, dedupe=False)
    else:
        with capture(taps, save):
            emb, layout = encode_pixels(*args, use_jit=False, return_layout=True, dedupe=False)
    save(prefix + "vit_out_with_GN", layout)
    save(prefix + "img_embeds", emb)
    return emb


def decoder_rows(model, embeds, im_mask: np.ndarray, infer_mode: str, save) -> None:
    """The model's uncached forward (InternLM2Model: every decoder layer and the norm), run eagerly with hooks
    on each layer's attention, feed-forward and the layer itself (see hooks.llm_taps)."""
    b, l = int(embeds.shape[0]), int(embeds.shape[1])
    m, cos, sin, mask, _ = model.sequence_inputs(b, l, im_mask)
    with capture(llm_taps(model), save):
        model.model(embeds.astype(model.compute_dtype), m, cos, sin, mask, infer_mode)


def run_mindspore(model_dir: str, images: Sequence, query: str, store, dtype: str = "fp32",
                  mode: str = "pynative", steps: int = 4, hd_num: int = 24, infer_mode: str = "base",
                  weights: Optional[Mapping] = None, log=print) -> None:
    """Runs the MindSpore model and saves every row to `store` (the model is freed on return)."""
    from ..chat import interleav_wrap_chat
    from ..generation import capacity

    t0 = time.perf_counter()
    model, _ = build_ms_model(model_dir, DTYPE_NAMES[dtype], mode == "graph", weights)
    store.meta["timings"] = {"ms_load_s": time.perf_counter() - t0}
    log(f"[parity] MindSpore model loaded ({dtype}, {mode}) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    hds: List[int] = []  # hd_num per image, in prompt order

    def encode(image, hd):
        prefix = f"image{len(hds)}."
        hds.append(int(hd))
        return encode_with_rows(model, image, hd, prefix, store.save)

    model.encode_img = encode  # the vision rows are captured while interleav_wrap_chat encodes each image
    inputs, im_mask_t, _ = interleav_wrap_chat(model, query, list(images), hd_num=hd_num)
    del model.encode_img
    segments = [{"kind": "image", "index": seg.image, "hd_num": hds[seg.image]} if seg.is_image else
                {"kind": "text", "ids": [int(i) for i in seg.ids]} for seg in model.last_prompt.segments]
    embeds = inputs["inputs_embeds"]
    im_mask = im_mask_t.asnumpy().astype(bool)
    l = int(embeds.shape[1])
    store.save("llm.inputs_embeds", embeds)
    store.meta.update(segments=segments, seq_len=l, n_image_tokens=int(im_mask.sum()))
    np.save(os.path.join(store.root, "im_mask.npy"), im_mask)
    store.meta["timings"]["ms_vision_s"] = time.perf_counter() - t0
    log(f"[parity] MindSpore: prompt of {l} tokens ({int(im_mask.sum())} image tokens)")

    t0 = time.perf_counter()
    decoder_rows(model, embeds, im_mask, infer_mode, store.save)
    store.meta["timings"]["ms_layers_s"] = time.perf_counter() - t0

    # final norm, logits and greedy decoding: the model's own prefill/decode steps (jit in graph mode)
    t0 = time.perf_counter()
    logits, hid, cache = model.prefill(embeds, im_mask, None, infer_mode, cap=capacity(l + max(steps, 1)),
                                       last_only=False)  # cache slots as generate() sizes them
    store.save("llm.norm", hid)
    store.save("llm.logits", logits)
    last = logits.asnumpy()[:, -1, :]
    del logits, hid
    ids = []
    for k in range(steps):
        if k > 0:
            step_logits, _ = model.decode(model.embed(np.array([[ids[-1]]])), cache, infer_mode)
            store.save(f"generate.step{k}.logits", step_logits)
            last = step_logits.asnumpy()[:, -1, :]
        ids.append(int(last[0].argmax()))
    store.meta["greedy_ids"] = ids
    store.meta["timings"]["ms_generate_s"] = time.perf_counter() - t0
    store.meta["peak_rss_mb_ms"] = peak_rss_mb()
    store.write_manifest()
    del cache, embeds, model
    gc.collect()

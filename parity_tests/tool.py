"""ixc25-parity: module-by-module parity of the MindSpore port against our PyTorch reference.

The MindSpore side runs first and saves every captured activation to a work directory (one .npy per
module, in a fixed order); the model is then freed, and the PyTorch reference runs module by module,
comparing each output with the saved array as soon as it is produced. Only one framework's weights are
in memory at a time, and weights are read lazily from the checkpoint (one tensor at a time on top of the
model itself).

Row order (names):
  image{i}.pixel_values, image{i}.vit.views, image{i}.vit.embeddings, image{i}.vit.pre_layrnorm,
  image{i}.vit.layers.{j}, image{i}.vit_out_with_GN, image{i}.img_embeds,
  llm.inputs_embeds, llm.layers.{j}.attention, llm.layers.{j}.mlp, llm.layers.{j},
  llm.norm, llm.logits, generate.step{k}.logits (k >= 1), generate.greedy_ids

Python API: `run_parity(...)` (separate weight mappings for each side allowed); CLI: `main(argv)`.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

os.environ.setdefault("GLOG_v", "3")

from parity_tests.tolerance import TOLERANCE, compare, passes  # noqa: E402

VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


# ============================================================================================ lazy weights
class LazyArray:
    """A tensor of a checkpoint read on demand: `.shape` from the source, data (floats as float32) via np.asarray()."""

    def __init__(self, source, key: str):
        self._source, self._key = source, key
        self.shape = tuple(source.shape(key))

    def __array__(self, dtype=None, copy=None):
        arr = self._source.read(self._key, np.float32)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    @property
    def ndim(self):
        return len(self.shape)


class LazyWeights(Mapping):
    """{official key: LazyArray} over a checkpoint of any layout (ixc25_ms.weights.layout.open_weights).

    `overrides` replaces (or adds) entries with in-memory arrays, e.g. a deliberately corrupted weight."""

    def __init__(self, path: str, overrides: Optional[Mapping] = None, allow_pickle: bool = False):
        from ixc25_ms.weights.layout import open_weights
        self.path = path
        source = open_weights(path, allow_pickle)
        self._items: Dict[str, object] = {k: LazyArray(source, k) for k in source.keys()}
        for k, v in (overrides or {}).items():
            self._items[k] = v

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def only(self, prefixes: Sequence[str]) -> Dict[str, object]:
        return {k: v for k, v in self._items.items() if k.startswith(tuple(prefixes))}


# ============================================================================================ activations on disk
class ActivationStore:
    """Saves activations as numbered .npy files and a manifest (name, file, shape, dtype) in a directory."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.rows: List[dict] = []
        self.meta: dict = {}

    def save(self, name: str, value) -> None:
        arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        fn = f"{len(self.rows):04d}_{name.replace('/', '_')}.npy"
        np.save(os.path.join(self.root, fn), arr)
        self.rows.append({"name": name, "file": fn, "shape": list(arr.shape), "dtype": str(arr.dtype)})

    def load(self, name: str) -> np.ndarray:
        for r in self.rows:
            if r["name"] == name:
                return np.load(os.path.join(self.root, r["file"]))
        raise KeyError(name)

    def write_manifest(self) -> None:
        with open(os.path.join(self.root, "manifest.json"), "w") as f:
            json.dump({"rows": self.rows, "meta": self.meta}, f, indent=1)

    @classmethod
    def open(cls, root: str) -> "ActivationStore":
        s = cls(root)
        with open(os.path.join(root, "manifest.json")) as f:
            d = json.load(f)
        s.rows, s.meta = d["rows"], d["meta"]
        return s


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _release_host_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _is_video(image) -> bool:
    from ixc25_ms.video import is_video_path
    return isinstance(image, (str, os.PathLike)) and is_video_path(image)


def _canvas(image, hd_num: int, font_path=None):
    """The padded RGB PIL image both frameworks normalise (host code shared by both sides)."""
    from ixc25_ms.processing import hd_transform, load_image
    if _is_video(image):
        from ixc25_ms.video import frames_to_image, load_video_frames, video_transform
        return video_transform(frames_to_image(load_video_frames(image), font_path))
    return hd_transform(load_image(image), hd_num)


# ============================================================================================ MindSpore side
def build_ms_model(model_dir: str, dtype: str, use_jit: bool, weights: Optional[Mapping] = None):
    """As ixc25_ms.model.load, but filling parameters from a lazy mapping (one checkpoint tensor in memory
    at a time on top of the model)."""
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.weights.loader import assign_state_dict
    from ixc25_ms.model import InternLMXComposer2ForCausalLM
    from ixc25_ms.tokenizer import InternLM2Tokenizer
    cfg = IXCConfig.from_file(model_dir)
    tok = InternLM2Tokenizer.from_pretrained(model_dir)
    state = weights if weights is not None else LazyWeights(model_dir)
    model = InternLMXComposer2ForCausalLM(cfg, dtype=dtype, use_jit=use_jit)
    assign_state_dict(model, state, model_dir)
    model.tokenizer = tok
    return model, tok


def run_mindspore(model_dir: str, images: Sequence, query: str, store: ActivationStore, dtype: str = "fp32",
                  mode: str = "pynative", steps: int = 4, hd_num: int = 24, infer_mode: str = "base",
                  weights: Optional[Mapping] = None, log=print) -> None:
    """Runs the MindSpore model and saves every row to `store` (the model is freed on return)."""
    import mindspore as ms
    from mindspore import Tensor

    from ixc25_ms.chat import interleav_wrap_chat
    from ixc25_ms.processing import preprocess_image, to_pixel_values
    from ixc25_ms.vision import encode_pixels, split_views

    use_jit = mode == "graph"
    t0 = time.perf_counter()
    model, _ = build_ms_model(model_dir, DTYPE_NAMES[dtype], use_jit, weights)
    cfg = model.cfg
    store.meta["timings"] = {"ms_load_s": time.perf_counter() - t0}
    log(f"[parity] MindSpore model loaded ({dtype}, {mode}) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    np_dt = {"fp32": np.float32, "fp16": np.float16}[dtype]
    vm = model.vit.vision_tower.vision_model

    hds: List[int] = []  # hd_num per image, in prompt order

    def encode(image, hd):
        p = f"image{len(hds)}."
        hds.append(int(hd))
        if _is_video(image):
            pv = to_pixel_values(_canvas(image, hd, model.font_path))
        else:
            pv = preprocess_image(image, hd_num=hd)
        store.save(p + "pixel_values", pv)
        views = split_views(pv)
        store.save(p + "vit.views", views)
        # per-layer rows: the tower's own cells, one by one (PyNative)
        x = vm.embeddings(ms.ops.cast(Tensor(views.astype(np_dt)), model.vit.compute_dtype))
        store.save(p + "vit.embeddings", x)
        x = vm.pre_layrnorm(x)
        store.save(p + "vit.pre_layrnorm", x)
        for j, layer in enumerate(vm.encoder.layers):
            x = layer(x)
            store.save(f"{p}vit.layers.{j}", x)
        del x
        # final rows: the model's own path (ViT through forward_jit in graph mode)
        emb, layout = encode_pixels(model.vit, model.vision_proj, model.plora_glb_GN, model.plora_sub_GN, pv,
                                    use_jit=model.use_jit, return_layout=True)
        store.save(p + "vit_out_with_GN", layout)
        store.save(p + "img_embeds", emb)
        return emb

    model.encode_img = encode  # the vision rows are captured while interleav_wrap_chat encodes each image
    inputs, im_mask_t, _ = interleav_wrap_chat(model, query, list(images), hd_num=hd_num)
    del model.encode_img
    segments = [{"kind": "image", "index": seg.image, "hd_num": hds[seg.image]} if seg.is_image else
                {"kind": "text", "ids": [int(i) for i in seg.ids]} for seg in model.last_prompt.segments]
    embeds = inputs["inputs_embeds"]
    im_mask = im_mask_t.asnumpy().astype(bool)
    b, l = int(embeds.shape[0]), int(embeds.shape[1])
    store.save("llm.inputs_embeds", embeds)
    store.meta.update(segments=segments, seq_len=l, n_image_tokens=int(im_mask.sum()))
    np.save(os.path.join(store.root, "im_mask.npy"), im_mask)
    store.meta["timings"]["ms_vision_s"] = time.perf_counter() - t0
    log(f"[parity] MindSpore: prompt of {l} tokens ({int(im_mask.sum())} image tokens)")

    # decoder layers one by one through the layer's own cells
    t0 = time.perf_counter()
    am = np.ones((b, l), np.int64)
    imt, cos, sin, mask, _ = model.sequence_inputs(b, l, im_mask, am)
    h = embeds.astype(model.compute_dtype)
    for j, layer in enumerate(model.model.layers):
        a = layer.attention(layer.attention_norm(h), imt, cos, sin, mask, infer_mode)
        store.save(f"llm.layers.{j}.attention", a)
        h = h + a
        f = layer.feed_forward(layer.ffn_norm(h), imt, infer_mode)
        store.save(f"llm.layers.{j}.mlp", f)
        h = h + f
        store.save(f"llm.layers.{j}", h)
        del a, f
    del h
    store.meta["timings"]["ms_layers_s"] = time.perf_counter() - t0

    # final norm, logits and greedy decoding: the model's own prefill/decode steps (jit in graph mode)
    t0 = time.perf_counter()
    from ixc25_ms.generation import capacity
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
    store.meta["peak_rss_mb_ms"] = _peak_rss_mb()
    store.write_manifest()
    del cache, embeds, model
    gc.collect()


# ============================================================================================ PyTorch side
CHUNK = 1 << 22  # elements per float64 chunk in compare_chunked


def compare_chunked(ours: np.ndarray, ref: np.ndarray, chunk: int = CHUNK) -> dict:
    """tolerance.compare's metrics (max_abs, rel_fro, cos, ref_max) accumulated over float64 chunks, so
    large tensors (logits of long prompts) need no full float64 copies."""
    if ours.size <= chunk:
        return compare(ours, ref)
    a, b = ours.reshape(-1), ref.reshape(-1)
    max_abs = ref_max = dd = aa = bb = ab = 0.0
    for i in range(0, a.size, chunk):
        x = a[i:i + chunk].astype(np.float64)
        y = b[i:i + chunk].astype(np.float64)
        d = x - y
        max_abs = max(max_abs, float(np.abs(d).max()))
        ref_max = max(ref_max, float(np.abs(y).max()))
        dd += float(d @ d)
        aa += float(x @ x)
        bb += float(y @ y)
        ab += float(x @ y)
    nb, na = np.sqrt(bb), np.sqrt(aa)
    return {"max_abs": max_abs, "rel_fro": float(np.sqrt(dd) / max(nb, 1e-30)),
            "cos": float(ab / max(na * nb, 1e-30)), "ref_max": ref_max}


class _Comparer:
    """Compares each reference output with the saved MindSpore array as soon as it is produced."""

    def __init__(self, store: ActivationStore, dtype: str, table: dict, overrides: dict, log=print):
        self.store, self.dtype, self.table, self.overrides, self.log = store, dtype, table, overrides, log
        self.results: Dict[str, dict] = {}

    def tolerance(self, name: str) -> dict:
        tol = dict(self.table[self.dtype])
        for pat, per_dtype in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat) and self.dtype in per_dtype:
                tol.update(per_dtype[self.dtype])
        return tol

    def __call__(self, name: str, ref) -> None:
        from parity_tests.tolerance import to_numpy
        ref = to_numpy(ref)
        try:
            ours = self.store.load(name)
        except KeyError:
            self.results[name] = {"module": name, "error": "not captured on the MindSpore side", "pass": False}
            return
        row = {"module": name, "shape": list(ours.shape), "ours_dtype": str(ours.dtype)}
        if ours.shape != ref.shape:
            row.update(error=f"shape mismatch: ours {list(ours.shape)} vs reference {list(ref.shape)}")
            row["pass"] = False
        else:
            m = compare_chunked(ours, ref)
            tol = self.tolerance(name)
            ok = passes(m, self.dtype, {self.dtype: tol}) and bool(np.isfinite(ours).all())
            row.update(max_abs=m["max_abs"], rel_fro=m["rel_fro"], cos=m["cos"], ref_max=m["ref_max"],
                       tolerance=tol, **{"pass": ok})
        self.results[name] = row


def run_reference(model_dir: str, store: ActivationStore, emit: _Comparer, ref_dtype: str = "fp32",
                  images: Sequence = (), infer_mode: str = "base", weights: Optional[Mapping] = None,
                  log=print) -> List[int]:
    """Runs our PyTorch reference on the same inputs (token ids, image slots, greedy prefix from the
    MindSpore run) and hands every output to `emit`. Returns the reference greedy ids."""
    import torch
    import torch.nn.functional as F

    from ixc25_ms.config import IXCConfig
    from parity_tests.reference.language import RefLM, rms_norm
    from parity_tests.reference.vision import VisionReference, normalize_rgb

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
            vref = VisionReference(vstate, cfg.vision, tdt)
            del vstate
            for s in segs:
                if s["kind"] != "image":
                    continue
                i, p = s["index"], f"image{s['index']}."
                pv = normalize_rgb(np.array(_canvas(images[i], s["hd_num"])))
                emit(p + "pixel_values", pv)
                views, hh, ww = vref.views(pv)
                emit(p + "vit.views", views)
                x = vref.embed(views)
                emit(p + "vit.embeddings", x)
                x = vref._ln(x, vref.p + "pre_layrnorm")
                emit(p + "vit.pre_layrnorm", x)
                for j in range(vref.layers):
                    x = vref.layer(j, x)
                    emit(f"{p}vit.layers.{j}", x)
                lay = vref.layout(x[:, 1:], hh, ww)
                emit(p + "vit_out_with_GN", lay)
                img_embeds[i] = vref.project(lay)
                emit(p + "img_embeds", img_embeds[i])
                del x, lay, views, pv
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


# ============================================================================================ orchestration
def load_tolerance_table(path: Optional[str]):
    """(table, module overrides). The file is JSON: {"fp32": {"rel_fro": .., "max_abs_rel": ..}, ...,
    "modules": {"glob pattern": {"fp16": {...}}}}; given entries update the defaults."""
    table = copy.deepcopy(TOLERANCE)
    overrides = {}
    if path:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        for k, v in d.items():
            if k == "modules":
                overrides = dict(v)
            elif isinstance(v, dict):
                table.setdefault(k, {}).update(v)
            else:
                raise ValueError(f"{path}: entry {k!r} must be an object")
    for k, v in table.items():
        missing = {"rel_fro", "max_abs_rel"} - set(v)
        if missing:
            raise ValueError(f"tolerance table: dtype {k!r} lacks {sorted(missing)}")
    return table, overrides


def run_parity(model: str, images: Sequence = (), query: str = "Describe this image in detail.",
               dtype: str = "fp32", mode: str = "pynative", steps: int = 4, tolerance_table: Optional[str] = None,
               ms_model: Optional[str] = None, ms_weights: Optional[Mapping] = None,
               ref_weights: Optional[Mapping] = None, ref_dtype: str = "fp32", hd_num: int = 24,
               infer_mode: str = "base", workdir: Optional[str] = None, keep: bool = False, log=print) -> dict:
    """Run both sides and return the report dict (rows in capture order, first_failure, passed, ...).

    ms_model: a different checkpoint directory for the MindSpore side (config/tokenizer/weights);
    ms_weights / ref_weights: weight mappings (official keys) replacing each side's checkpoint weights."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    if mode not in ("pynative", "graph"):
        raise ValueError(f"mode must be 'pynative' or 'graph', got {mode!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    for img in images:
        if not os.path.isfile(img):
            raise FileNotFoundError(f"{img}: no such image file")
    table, overrides = load_tolerance_table(tolerance_table)
    if dtype not in table:
        raise ValueError(f"tolerance table has no entry for {dtype}")
    root = workdir or tempfile.mkdtemp(prefix="ixc25-parity-")
    store = ActivationStore(root)
    try:
        t_all = time.perf_counter()
        run_mindspore(ms_model or model, images, query, store, dtype, mode, steps, hd_num, infer_mode,
                      ms_weights, log)
        _release_host_memory()
        rss_ms = store.meta["peak_rss_mb_ms"]
        rss_freed = _current_rss_mb()
        emit = _Comparer(store, dtype, table, overrides, log)
        ref_ids = run_reference(model, store, emit, ref_dtype, images, infer_mode, ref_weights, log)
        rows = []
        for r in store.rows:  # capture order
            rows.append(emit.results.get(r["name"], {"module": r["name"], "shape": r["shape"], "pass": False,
                                                      "error": "not produced by the reference"}))
        for name, r in emit.results.items():
            if not any(x["module"] == name for x in rows):
                rows.append(r)
        ours_ids = store.meta["greedy_ids"]
        if steps:
            mism = next((k for k, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None)
            row = {"module": "generate.greedy_ids", "shape": [1, steps], "ours": ours_ids, "ref": ref_ids,
                   "pass": mism is None}
            if mism is not None:
                row["mismatch_step"] = mism
                row["ref_top2_margin"] = store.meta["ref_margins"][mism]
            rows.append(row)
        first = next((r["module"] for r in rows if not r["pass"]), None)
        report = {
            "tool": "ixc25-parity", "model": model, "ms_model": ms_model, "images": list(images), "query": query,
            "dtype": dtype, "ref_dtype": ref_dtype, "mode": mode, "steps": steps, "hd_num": hd_num,
            "infer_mode": infer_mode,
            "ms_weights_overridden": ms_weights is not None, "ref_weights_overridden": ref_weights is not None,
            "tolerance": table[dtype], "tolerance_overrides": overrides,
            "seq_len": store.meta["seq_len"], "n_image_tokens": store.meta["n_image_tokens"],
            "segments": [{k: v for k, v in s.items() if k != "ids"} | ({"n_ids": len(s["ids"])} if "ids" in s else {})
                         for s in store.meta["segments"]],
            "greedy_ids": {"ours": ours_ids, "ref": ref_ids},
            "rows": rows, "n_rows": len(rows), "n_failed": sum(not r["pass"] for r in rows),
            "first_failure": first, "passed": first is None,
            "timings_s": {k: round(v, 3) for k, v in store.meta["timings"].items()},
            "total_s": round(time.perf_counter() - t_all, 3),
            "peak_rss_mb": {"after_mindspore": round(rss_ms, 1), "after_reference": round(_peak_rss_mb(), 1)},
            "rss_mb_after_mindspore_freed": round(rss_freed, 1),
            "workdir": root if keep else None,
        }
        return report
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)


# ============================================================================================ output
def _fmt(v, spec=".3e"):
    return "-" if v is None else format(v, spec)


def _shape(r):
    return "x".join(str(s) for s in r.get("shape", [])) or "-"


def _status(r):
    if r["pass"]:
        return "PASS"
    return "FAIL" + (f" ({r['error']})" if "error" in r else "")


def format_table(report: dict) -> str:
    rows = report["rows"]
    w = max([len("module")] + [len(r["module"]) for r in rows])
    ws = max([len("shape")] + [len(_shape(r)) for r in rows])
    head = f"{'module':<{w}}  {'shape':<{ws}}  {'max_abs':>10}  {'rel_fro':>10}  {'cos':>12}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["module"] == "generate.greedy_ids":
            extra = f"ours {r['ours']} ref {r['ref']}"
            if "mismatch_step" in r:
                extra += f", first mismatch at step {r['mismatch_step']}"
            lines.append(f"{r['module']:<{w}}  {_shape(r):<{ws}}  {'exact':>10}  {'':>10}  {'':>12}  "
                         f"{_status(r)}  {extra}")
            continue
        lines.append(f"{r['module']:<{w}}  {_shape(r):<{ws}}  {_fmt(r.get('max_abs')):>10}  "
                     f"{_fmt(r.get('rel_fro')):>10}  {_fmt(r.get('cos'), '.8f'):>12}  {_status(r)}")
    return "\n".join(lines)


def summary_line(report: dict) -> str:
    if report["passed"]:
        return f"PASS: all {report['n_rows']} modules within the {report['dtype']} tolerance"
    return (f"FAIL: first failing module: {report['first_failure']} "
            f"({report['n_failed']} of {report['n_rows']} modules failed)")


def to_markdown(report: dict, command: Optional[str] = None) -> str:
    tol = report["tolerance"]
    ms_model = f" (MindSpore side: `{report['ms_model']}`)" if report["ms_model"] else ""
    times = ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items())
    out = ["# ixc25-parity report", ""]
    if command:
        out += ["Command:", "", "```", command, "```", ""]
    out += [f"**{summary_line(report)}**", "",
            f"- model: `{report['model']}`{ms_model}",
            f"- images: {', '.join('`' + i + '`' for i in report['images']) or 'none'}; "
            f"query: {report['query']!r}",
            f"- MindSpore dtype {report['dtype']}, mode {report['mode']}; reference (PyTorch) dtype "
            f"{report['ref_dtype']}; infer_mode {report['infer_mode']}; greedy steps {report['steps']}",
            f"- prompt: {report['seq_len']} tokens, {report['n_image_tokens']} of them image tokens",
            f"- tolerance ({report['dtype']}): rel_fro <= {tol['rel_fro']:g} and "
            f"max_abs <= {tol['max_abs_rel']:g} * max|ref|"
            + (f"; per-module overrides {report['tolerance_overrides']}" if report["tolerance_overrides"] else ""),
            f"- time: {report['total_s']:.1f} s in all ({times}); "
            f"peak RSS {report['peak_rss_mb']['after_mindspore']:.0f} MB after the MindSpore side, "
            f"{report['peak_rss_mb']['after_reference']:.0f} MB overall", "",
            "| # | module | shape | max abs err | rel Frobenius | cosine | result |",
            "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["rows"]):
        if r["module"] == "generate.greedy_ids":
            note = f"ours {r['ours']}, ref {r['ref']}"
            if "mismatch_step" in r:
                note += f"; first mismatch at step {r['mismatch_step']} (ref top-2 margin {r['ref_top2_margin']:.3g})"
            out.append(f"| {i} | `{r['module']}` | {_shape(r)} | exact match | | | "
                       f"{'PASS' if r['pass'] else '**FAIL**'}: {note} |")
            continue
        res = "PASS" if r["pass"] else "**FAIL**" + (f" ({r['error']})" if "error" in r else "")
        out.append(f"| {i} | `{r['module']}` | {_shape(r)} | {_fmt(r.get('max_abs'))} | {_fmt(r.get('rel_fro'))} | "
                   f"{_fmt(r.get('cos'), '.8f')} | {res} |")
    out += ["", "Rows: MindSpore output vs our PyTorch reference on the same weights and inputs. Each side runs "
            "its own chain (errors accumulate as in real use). `generate.stepK.logits` are the cached-decode "
            "logits of step K with the reference teacher-forced on the MindSpore ids, so they stay comparable "
            "after a divergence; `generate.greedy_ids` must match exactly.", ""]
    return "\n".join(out)


def write_reports(report: dict, paths: Sequence[str], command: Optional[str] = None) -> None:
    for p in paths:
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
        if p.lower().endswith(".md"):
            text = to_markdown(report, command)
        elif p.lower().endswith(".json"):
            text = json.dumps(dict(report, command=command), indent=1)
        else:
            raise ValueError(f"{p}: report must end in .json or .md")
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)


# ============================================================================================ memory estimate
def input_geometry(images: Sequence, hd_num: int = 24, text_tokens: int = 30):
    """(ViT views, prompt length) the given images would give (images only; videos are not planned)."""
    from PIL import Image

    from ixc25_ms.processing import PATCH, hd_plan
    from ixc25_ms.vision import expected_tokens
    if len(images) > 1:
        hd_num = 6
    views, seq = 0, text_tokens
    for img in images:
        with Image.open(img) as im:
            width, height = im.size
        new_w, new_h = hd_plan(width, height, hd_num)
        a, b = new_w // PATCH, -(-new_h // PATCH)  # crops along the long / short side
        rows, cols = (a, b) if width < height else (b, a)
        views += 1 + rows * cols
        seq += expected_tokens(rows, cols)
    return views, seq


def estimate_memory(cfg, dtype: str = "fp32", seq_len: int = 1267, n_views: int = 3, steps: int = 4,
                    ref_dtype: str = "fp32") -> dict:
    """Rough host memory (GiB) of each side and disk for the saved activations, from the parameter count
    and the shapes of the largest activations (eager attention materialises heads x L x L scores)."""
    from ixc25_ms.weights.spec import expected_parameters, num_parameters
    n = num_parameters(cfg)
    nb = {"fp32": 4, "fp16": 2}[dtype]
    rb = {"fp32": 4, "fp16": 2}[ref_dtype]
    v, L, H, V = cfg.vision, seq_len, cfg.hidden_size, cfg.vocab_size
    gib = float(1024 ** 3)
    vit_attn = 3 * n_views * v.num_attention_heads * v.num_positions ** 2 * 4 if n_views else 0
    llm_attn = 3 * cfg.num_attention_heads * L * L * 4 + L * L * 4  # scores, probs, cast + the mask
    mlp = 3 * L * cfg.intermediate_size * max(nb, rb)
    logits = 2 * L * V * 4
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (L + steps + 64) * cfg.head_dim * max(nb, 4)
    act = max(vit_attn, llm_attn + mlp) + logits + kv
    vis_rows = n_views * (3 * 560 * 560 * 4 + (2 + v.num_hidden_layers) * v.num_positions * v.hidden_size * nb)
    img_tok = max(L - 30, 0)
    vis_rows += img_tok * (cfg.vit_merged_dim + H) * nb
    llm_rows = (3 * cfg.num_hidden_layers + 2) * L * H * nb + L * V * 4 + steps * V * 4
    # imported libraries (~0.7 GiB measured) + loading one checkpoint tensor (fp32 read + a copy)
    largest = max(int(np.prod(shape)) for shape in expected_parameters(cfg).values())
    overhead = 0.7 * gib + 2 * largest * 4
    ms_side = n * nb + act + overhead
    ref_side = n * rb + act + overhead
    return {"parameters": n, "seq_len": L, "vit_views": n_views,
            "ms_weights_gib": round(n * nb / gib, 2), "ref_weights_gib": round(n * rb / gib, 2),
            "activations_gib": round(act / gib, 2), "overhead_gib": round(overhead / gib, 2),
            "ms_side_gib": round(ms_side / gib, 2), "ref_side_gib": round(ref_side / gib, 2),
            # MindSpore's host memory pool keeps its activation peak after the model is freed
            "peak_gib": round(max(ms_side, ref_side + act) / gib, 2),
            "disk_gib": round((vis_rows + llm_rows) / gib, 2)}


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ixc25-parity",
        description="Module-by-module parity of the MindSpore IXC2.5 port against our PyTorch reference "
                    "(same weights, same input). Exit status 0 only when every module passes.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer.model, weights)")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="image or video file(s), in prompt order (none: a text-only prompt)")
    p.add_argument("--query", default="Describe this image in detail.", help="user query (default: %(default)r)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="MindSpore compute dtype")
    p.add_argument("--mode", choices=["pynative", "graph"], default="pynative",
                   help="graph: model built with use_jit=True (ViT forward_jit, jit prefill/decode); "
                        "per-layer rows always come from calling the cells one by one")
    p.add_argument("--report", action="append", default=[], metavar="FILE",
                   help="write a report: .json or .md (repeatable)")
    p.add_argument("--tolerance-table", metavar="FILE", help="JSON tolerance table overriding the defaults")
    p.add_argument("--steps", type=int, default=4, help="greedy decoding steps to compare (default 4)")
    p.add_argument("--hd-num", type=int, default=24, help="HD crop budget (forced to 6 with several images)")
    p.add_argument("--infer-mode", choices=["base", "write", "web"], default="base")
    p.add_argument("--ref-dtype", choices=["fp32", "fp16"], default="fp32", help="PyTorch reference dtype")
    p.add_argument("--workdir", help="directory for the saved activations (kept); default a temp dir, removed")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the estimated memory (GiB) for --model's config.json and the --image geometry, "
                        "then exit (no weights are read)")
    p.add_argument("--ms-model", help=argparse.SUPPRESS)  # testing: a different checkpoint for the MindSpore side
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ixc25_ms.weights import CheckpointError
    from ixc25_ms.config import ConfigError, IXCConfig
    if args.estimate_memory:
        try:
            cfg = IXCConfig.from_file(args.model)
        except ConfigError as e:
            print(f"ixc25-parity: error: {e}", file=sys.stderr)
            return 2
        try:
            views, seq = input_geometry(args.image, args.hd_num)
        except (OSError, ValueError) as e:
            print(f"ixc25-parity: error: {e}", file=sys.stderr)
            return 2
        est = estimate_memory(cfg, args.dtype, seq, views, args.steps, args.ref_dtype)
        print(json.dumps(est, indent=1))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("ixc25-parity: error: the PyTorch reference needs torch (pip install 'ixc25-ms[test]')",
              file=sys.stderr)
        return 2
    command = "ixc25-parity " + shlex.join(argv)
    try:
        report = run_parity(args.model, args.image, args.query, args.dtype, args.mode, args.steps,
                            args.tolerance_table, ms_model=args.ms_model, ref_dtype=args.ref_dtype,
                            hd_num=args.hd_num, infer_mode=args.infer_mode, workdir=args.workdir,
                            keep=bool(args.workdir))
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ixc25-parity: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(summary_line(report))
    try:
        write_reports(report, args.report, command)
    except (OSError, ValueError) as e:
        print(f"ixc25-parity: error: {e}", file=sys.stderr)
        return 2
    for p in args.report:
        print(f"[parity] report written: {p}")
    return 0 if report["passed"] else 1

"""ixc25-bench workers: one contender per process (MindSpore PyNative/jit or the PyTorch reference), timed repeats."""
# Driven over stdin/stdout by scripts/bench.py; each worker builds the synthetic model of ixc25_ms.testing.
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ixc25_ms.testing import TinyModelTester, make_image, peak_rss_mb, reset_peak, vm

MARK = "@@BENCH "


class _Prompt:
    """[BOS] + image tokens + `n_text` text ids (the layout interleav_wrap_chat builds for one image)."""

    def __init__(self, cfg, n_text: int, seed: int):
        rng = np.random.default_rng(seed + 1)
        self.pre = np.array([[cfg.bos_token_id]], np.int64)
        self.post = rng.integers(3, cfg.vocab_size, size=(1, n_text)).astype(np.int64)


class MSWorker:
    def __init__(self, args, use_jit: bool):
        import ixc25_ms
        import mindspore as ms
        self.ms = ms  # the bench's cached checkpoint, loaded as a user loads it (write/web LoRAs lazy)
        self.model, _ = ixc25_ms.load(args.ckpt, dtype=args.dtype, use_jit=use_jit, quantize=args.quantize)

    def start(self, pv, prompt, n_new):
        """ViT + prefill + first token; returns (timings, generator of (step seconds, id) per decode step)."""
        from mindspore import ops
        from ixc25_ms.generation import GenerationConfig, iter_generate
        m = self.model
        t0 = time.perf_counter()
        img = m.img2emb(pv)
        img.asnumpy()
        t1 = time.perf_counter()
        embeds = ops.cat([m.embed(prompt.pre), img.astype(m.compute_dtype), m.embed(prompt.post)], 1)
        n_img = int(img.shape[1])
        im_mask = np.concatenate([np.zeros(1, bool), np.ones(n_img, bool), np.zeros(prompt.post.shape[1], bool)])[None]
        gen = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, pad_token_id=m.cfg.pad_token_id)
        t2 = time.perf_counter()
        it = iter_generate(m, embeds, im_mask, None, gen)
        first = int(next(it)[0])
        info = dict(vision_s=t1 - t0, prep_s=t2 - t1, prefill_s=time.perf_counter() - t2, L=int(embeds.shape[1]),
                    first=first)
        return info, _timed(int(nxt[0]) for nxt in it)


class TorchWorker:
    def __init__(self, tester, args):
        import torch
        self.torch = torch
        dt = torch.float16 if args.dtype == "float16" else torch.float32
        self.vis = tester.ref_vision(dt)  # draws every weight once; the LLM's are then taken from them
        self.lm = tester.ref_lm(dt)
        self.cfg = tester.cfg

    def _forward(self, embeds, im_mask, am, past):
        """RefLM.forward with the output head on the last position only (as the MindSpore prefill)."""
        import torch
        from parity_tests.reference.language import rms_norm
        lm = self.lm
        b, l, _ = embeds.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        total = past_len + l
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)[:, past_len:]
        cos, sin = lm.rope(pos, total)
        causal = torch.ones(l, total, dtype=torch.bool).tril(past_len)
        allowed = causal[None] & (am[:, None, :] > 0)
        mask = torch.zeros(b, 1, l, total).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        h, new = embeds.to(lm.dtype), []
        for i in range(self.cfg.num_hidden_layers):
            h, kv = lm.layer(i, h, im_mask, cos, sin, mask, None if past is None else past[i], "base")
            new.append(kv)
        h = rms_norm(h[:, -1:], lm.w["model.norm.weight"], self.cfg.rms_norm_eps)
        return (h @ lm.w["output.weight"].T).float(), new

    def start(self, pv, prompt, n_new):
        """ViT + prefill + first token; returns (timings, generator of (step seconds, id) per decode step)."""
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            _, img = self.vis.encode(pv)
            t1 = time.perf_counter()
            lm = self.lm
            embeds = torch.cat([lm.embed(prompt.pre), img.to(lm.dtype), lm.embed(prompt.post)], 1)
            n_img = int(img.shape[1])
            im_mask = torch.cat([torch.zeros(1), torch.ones(n_img), torch.zeros(prompt.post.shape[1])])[None]
            l = embeds.shape[1]
            t2 = time.perf_counter()
            logits, past = self._forward(embeds, im_mask, torch.ones(1, l, dtype=torch.long), None)
            first = int(logits[0, -1].argmax())
            info = dict(vision_s=t1 - t0, prep_s=t2 - t1, prefill_s=time.perf_counter() - t2, L=int(l), first=first)

        def ids(nxt, past, n):  # one decode step per id, the cache grown by concatenation
            while True:
                n += 1
                with torch.inference_mode():
                    logits, past = self._forward(lm.embed([[nxt]]), None, torch.ones(1, n, dtype=torch.long), past)
                    nxt = int(logits[0, -1].argmax())
                yield nxt
        return info, _timed(ids(first, past, int(l)))


def _timed(ids):
    """(seconds, id) per decode step: each step of the id iterator `ids` timed on its own."""
    ids = iter(ids)
    while True:
        t = time.perf_counter()
        try:
            nxt = next(ids)
        except StopIteration:
            return
        yield time.perf_counter() - t, nxt


def run_once(worker, pv, prompt, n_new) -> dict:
    """One timed repeat: ViT, prefill and the first token, then n_new - 1 decode steps."""
    info, steps = worker.start(pv, prompt, n_new)
    dts, ids = [], [info.pop("first")]
    for _ in range(n_new - 1):
        dt, nxt = next(steps)
        dts.append(dt)
        ids.append(nxt)
    return dict(info, steps_s=dts, ids=ids)


def _emit(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(name: str, spec: dict):
    """Worker process: build, report ready, then one timed repeat per 'run' line on stdin."""
    threads = spec["threads"]
    import torch
    torch.set_num_threads(threads)
    from ixc25_ms.processing import preprocess_image
    args = argparse.Namespace(**spec)
    t = time.perf_counter()
    if name.startswith("ms"):
        import mindspore as ms
        ms.set_context(mode=ms.PYNATIVE_MODE)
        ms.device_context.cpu.op_tuning.threads_num(threads)
    tester = TinyModelTester(spec["cfg"], seed=spec["seed"], init="bench")  # the same weights in every worker
    worker = TorchWorker(tester, args) if name == "torch-ref" else MSWorker(args, name == "ms-jit")
    tester.release()
    import gc
    gc.collect()
    pv = preprocess_image(make_image(*spec["image"]), hd_num=24)
    prompt = _Prompt(tester.cfg, spec["text_tokens"], spec["seed"])
    setup_s = time.perf_counter() - t
    rss_load = vm("VmRSS")
    peak_ok = reset_peak()
    model = getattr(worker, "model", None)
    _emit({"ready": True, "setup_s": setup_s, "rss_after_load_mb": rss_load,
           "views": int(pv.shape[2] // 560 * pv.shape[3] // 560 + 1),
           "cpu_kernels": bool(getattr(model, "cpu_kernels", False)), "quantize": spec.get("quantize"),
           "load_report": getattr(model, "load_report", None)})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            _emit(run_once(worker, pv, prompt, spec["new_tokens"]))
        elif cmd == "pstart":  # paired decode: prefill now, then steps in chunks on request
            info, paired = worker.start(pv, prompt, spec["new_tokens"])
            _emit({"first": info["first"]})
        elif cmd.startswith("psteps "):
            took = [next(paired) for _ in range(int(cmd.split()[1]))]
            _emit({"steps_s": [t for t, _ in took], "ids": [i for _, i in took]})
        elif cmd == "quit":
            _emit({"peak_rss_mb": vm("VmHWM"), "peak_since_load": peak_ok, "rss_end_mb": vm("VmRSS"),
                   "peak_rss_process_mb": peak_rss_mb()})
            return 0
    return 0

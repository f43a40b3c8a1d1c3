"""ixc25-bench-train: one fine-tuning step (forward + backward + AdamW), MindSpore vs our PyTorch reference.

The same seeded weights (the bench's mid config by default: vocab 92,544, LLM 1024 x 8 layers, ViT 1024 x 4 layers
at 560 px), the same conversation and 700x300 picture (the official training transform: 1 x 2 crops), full
fine-tuning (ViT trained, as finetune.sh) or LoRA (finetune_lora.sh: ViT and projector frozen), fp32. Each
contender runs in its own process, one after the other, `--rounds` times (A, B, A, B...: the machine's phase
hits both): warm-up step (compilation), then `--steps` timed steps. Reports step time, tokens/s and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MARK = "@@TRAIN "
CONTENDERS = ("ms-jit", "ms-pynative", "torch-ref")
ANSWER = ("The picture shows a smooth gradient from dark to light, with bands of colour that repeat across the "
          "width. Red grows from left to right, green from top to bottom, and blue follows the diagonal, so the "
          "corners differ: the top left is nearly black and the bottom right is bright. There are no objects, "
          "people or text; it is a synthetic test pattern made for measuring speed.")


def build_case(work: str, config: str, seed: int = 0) -> dict:
    """Writes (once per config and seed) an official-layout checkpoint with seeded weights, the picture and a
    one-item data file; returns their paths."""
    from ixc25_ms.testing import DEFAULT_CFG, QUICK_CFG, make_image, synthetic_state
    from ixc25_ms.weights.safetensors import write_safetensors
    from ixc25_ms.config import IXCConfig
    from PIL import Image
    root = os.path.join(work, f"{config}-{seed}")
    model = os.path.join(root, "model")
    done = os.path.join(root, "ready")
    if not os.path.exists(done):
        os.makedirs(model, exist_ok=True)
        cfg_dict = dict(DEFAULT_CFG if config == "mid" else QUICK_CFG)
        cfg = IXCConfig.from_dict(cfg_dict)
        state = synthetic_state(cfg, seed)
        write_safetensors(os.path.join(model, "model.safetensors"), {k: ("F32", v) for k, v in state.items()})
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(dict(cfg_dict, architectures=["InternLMXComposer2ForCausalLM"], model_type="internlm2"), f)
        tok = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                           "internlm2-tokenizer.model")
        if config == "mid":
            with open(tok, "rb") as a, open(os.path.join(model, "tokenizer.model"), "wb") as b:
                b.write(a.read())
        else:
            from ixc25_ms.tiny import train_tiny_tokenizer
            train_tiny_tokenizer(os.path.join(model, "tokenizer.model"))
        Image.fromarray(make_image(700, 300)).save(os.path.join(root, "picture.png"))
        item = {"id": 0, "image": "picture.png", "conversations": [
            {"from": "human", "value": "Describe the picture in detail."}, {"from": "bot", "value": ANSWER}]}
        with open(os.path.join(root, "data.json"), "w") as f:
            json.dump([item], f)
        open(done, "w").close()
    return {"root": root, "model": model, "data": os.path.join(root, "data.json")}


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _flags(mode: str) -> dict:
    if mode == "lora":  # finetune_lora.sh
        return dict(fix_vit=True, fix_sampler=True, use_lora=True, lora_r=64, lora_alpha=64, lora_dropout=0.0)
    return dict(fix_vit=False, fix_sampler=False, use_lora=False)  # finetune.sh


def ms_worker(case: dict, mode: str, steps: int, jit: bool, recompute: bool = False):
    """Our path: ixc25-finetune's Trainer, one train_step per optimizer step (collate, forward, backward, AdamW)."""
    import mindspore as ms
    from ixc25_ms.train.args import FinetuneArgs
    from ixc25_ms.train.trainer import Trainer
    os.chdir(case["root"])
    args = FinetuneArgs(model_name_or_path=case["model"], data_path=case["data"], output_dir="unused",
                        per_device_train_batch_size=1, batch_size=1, max_length=16384, hd_num=18, learning_rate=1e-5,
                        weight_decay=0.1, adam_beta2=0.95, plora_dropout=0.0, max_steps=steps + 1, quiet=True,
                        jit=jit, seed=0, gradient_checkpointing=recompute, **_flags(mode))
    tr = Trainer(args, log=lambda *a: None)
    times, tokens, losses = [], 0, []
    for s in range(steps + 1):
        t = time.perf_counter()
        loss, _, tokens, _ = tr.train_step(s)
        times.append(time.perf_counter() - t)
        losses.append(loss)
    return times, tokens, losses


def torch_worker(case: dict, mode: str, steps: int):
    """Our PyTorch reference: the same loss (parity_tests.reference.train), loss.backward(), clipping, AdamW."""
    import torch
    from ixc25_ms.weights.layout import load_state_dict
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.tokenizer import InternLM2Tokenizer
    from ixc25_ms.train.optim import decays
    from parity_tests.reference.train import TrainFlags, TrainLM, TrainVision, ref_loss, trainable_names
    with open(case["data"]) as f:
        items = json.load(f)
    cfg = IXCConfig.from_file(case["model"])
    weights = load_state_dict(case["model"])
    flags = TrainFlags(hd_num=18, max_length=16384, plora_dropout=0.0, **_flags(mode))
    if flags.use_lora:
        g = np.random.default_rng(0)
        for i in range(cfg.num_hidden_layers):
            for m in flags.lora_target_modules:
                w = weights[f"model.layers.{i}.{m}.weight"]
                weights[f"model.layers.{i}.{m}.lora_A.weight"] = (g.uniform(-1, 1, (flags.lora_r, w.shape[1])) /
                                                                  np.sqrt(w.shape[1])).astype(np.float32)
                weights[f"model.layers.{i}.{m}.lora_B.weight"] = np.zeros((w.shape[0], flags.lora_r), np.float32)
    names = trainable_names(list(weights), flags)
    lm, vis = TrainLM(cfg, weights, flags), TrainVision(cfg, weights, flags)
    del weights
    params = {}
    for n in names:
        t = lm.w.get(n) if n in lm.w else vis.w.get(n)
        if t is not None:
            params[n] = t.requires_grad_(True)
    groups = [{"params": [p for n, p in params.items() if decays(n)], "weight_decay": 0.1},
              {"params": [p for n, p in params.items() if not decays(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95))
    tok = InternLM2Tokenizer.from_pretrained(case["model"])
    times, tokens, losses = [], 0, []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss, batch = ref_loss(lm, vis, tok, items, case["root"], flags)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        tokens = int(batch["attention_mask"].sum())
        losses.append(float(loss.detach()))
    return times, tokens, losses


def worker_main(spec: dict) -> int:
    import torch
    torch.set_num_threads(spec["threads"])
    if spec["name"].startswith("ms"):
        import mindspore as ms
        ms.device_context.cpu.op_tuning.threads_num(spec["threads"])
    case = spec["case"]
    if spec["name"] == "torch-ref":
        times, tokens, losses = torch_worker(case, spec["mode"], spec["steps"])
    else:
        times, tokens, losses = ms_worker(case, spec["mode"], spec["steps"], spec["name"] == "ms-jit",
                                            spec.get("recompute", False))
    out = {"warmup_s": times[0], "steps_s": times[1:], "tokens": tokens, "losses": losses,
           "peak_rss_mb": _vm("VmHWM")}
    sys.stdout.write(MARK + json.dumps(out) + "\n")
    return 0


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, GLOG_v="3", OMP_NUM_THREADS=str(spec["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "scripts.bench_train", "--worker", json.dumps(spec)], cwd=root,
                       env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"worker {spec['name']} ({spec['mode']}) failed (rc {p.returncode}):\n{p.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("mid", "quick"), default="mid")
    ap.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--contenders", default="ms-jit,torch-ref", help="comma list of " + ",".join(CONTENDERS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    ap.add_argument("--rounds", type=int, default=1, help="each contender runs this many times, alternating")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ixc25-bench-train"))
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="MindSpore contenders recompute each layer in the backward (torch-ref does not)")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    case = build_case(args.workdir, args.config)
    names = [n for n in args.contenders.split(",") if n]
    if any(n not in CONTENDERS for n in names):
        ap.error(f"--contenders: one of {CONTENDERS}")
    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                res = run_worker(dict(name=n, mode=mode, steps=args.steps, threads=args.threads, case=case,
                                     recompute=args.gradient_checkpointing))
                results.setdefault(mode, {}).setdefault(n, []).append(res)
                print(f"[bench-train] {mode} {n}: step {statistics.median(res['steps_s']):.2f} s, warm-up "
                      f"{res['warmup_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
    table = ["| mode | contender | step s (median) | tokens/s | peak RSS MB | warm-up s | vs torch-ref speed | RSS vs torch-ref |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for mode, per in results.items():
        med = {n: statistics.median([s for r in rs for s in r["steps_s"]]) for n, rs in per.items()}
        rss = {n: max(r["peak_rss_mb"] for r in rs) for n, rs in per.items()}
        for n, rs in per.items():
            tok = rs[0]["tokens"]
            sp = med["torch-ref"] / med[n] if "torch-ref" in med else float("nan")
            rr = rss[n] / rss["torch-ref"] if "torch-ref" in rss else float("nan")
            summary.setdefault(mode, {})[n] = dict(step_s=med[n], tokens=tok, tokens_per_s=tok / med[n],
                                                   peak_rss_mb=rss[n], warmup_s=rs[0]["warmup_s"],
                                                   speed_vs_torch=sp, rss_vs_torch=rr,
                                                   losses=[r["losses"] for r in rs])
            table.append(f"| {mode} | {n} | {med[n]:.2f} | {tok / med[n]:.1f} | {rss[n]:.0f} | {rs[0]['warmup_s']:.1f} "
                         f"| {sp:.2f}x | {rr:.2f}x |")
    print("\n".join(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "threads": args.threads, "results": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

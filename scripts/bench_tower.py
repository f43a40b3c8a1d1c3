"""The tower warm-up's step (forward + backward), MindSpore jit vs our PyTorch reference, side by side.

`ixc25-tower-warmup`'s loss (ixc25_ms.train.tower_warmup.WarmupNet: the CLIP tower, a max-pooled tag head, the
per-patch tag loss and the per-patch colour regression) on the default model's tower shape (560 px, 28-px
patches, `--width` x `--layers`, heads of 32 channels), a batch of `--batch` pictures. The PyTorch contender is
the same loss written on parity_tests/reference/vision.py (plain torch). Both get the same seeded weights, pixels
and labels: the losses they print must agree (fp32, ~1e-6) before the times mean anything. Each contender runs
in its own process, one after the other, `--rounds` times (A, B, A, B: the machine's phase hits both), one
untimed step (compilation) then `--steps` timed ones; the median of each is reported, and their ratio.

    python scripts/bench_tower.py [--width 128 --layers 4 --batch 16 --steps 5 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MARK = "@@TOWER "
VIEW, PATCH, TAGS, COLOUR, DENSE = 560, 28, 3, 0.25, 1.0
PREFIX = "vit.vision_tower.vision_model."


def vision_config(width: int, layers: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": max(1, width // 32), "image_size": VIEW, "patch_size": PATCH,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}


def case(width: int, layers: int, batch: int, seed: int = 0):
    """Seeded tower weights (official names: ixc25_ms.testing.synthetic_state's vit.* tensors), head weights,
    pixels (B,3,R,R), one-hot tags and per-patch labels."""
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.testing import QUICK_CFG, synthetic_state
    cfg = IXCConfig.from_dict(dict(QUICK_CFG, vision_config=vision_config(width, layers)))
    state = {k: v for k, v in synthetic_state(cfg, seed).items() if k.startswith(PREFIX)}
    rng = np.random.default_rng(seed)
    c, g = width, VIEW // PATCH
    heads = {"head.weight": (TAGS, c), "head.bias": (TAGS,), "dense.weight": (TAGS + 1, c),
             "dense.bias": (TAGS + 1,), "colour.weight": (3, c), "colour.bias": (3,)}
    heads = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in heads.items()}
    px = rng.standard_normal((batch, 3, VIEW, VIEW)).astype(np.float32)
    target = np.eye(TAGS, dtype=np.float32)[rng.integers(0, TAGS, batch)]
    labels = rng.integers(0, TAGS + 1, (batch, g * g)).astype(np.int32)
    return state, heads, px, target, labels


def run_ms(width, layers, batch, steps):
    import mindspore as ms
    from mindspore import Tensor
    from ixc25_ms.config import VisionConfig
    from ixc25_ms.train.tower_warmup import WarmupNet
    state, heads, px, target, labels = case(width, layers, batch)
    net = WarmupNet(VisionConfig.from_dict(vision_config(width, layers)), TAGS, True, dense=DENSE, colour=COLOUR)
    params = []
    for p in net.get_parameters():
        key = PREFIX + p.name.split("vision_model.", 1)[1] if p.name.startswith("tower.") else p.name
        p.set_data(Tensor(state[key] if key in state else heads[key]))
        if ".post_layernorm." not in key:  # unused (as in the warm-up)
            params.append(p)
    step = ms.jit(ms.value_and_grad(net, None, params))
    args = (Tensor(px), Tensor(target), Tensor(labels))
    return _time(lambda: float(step(*args)[0].asnumpy()), steps)


def run_torch(width, layers, batch, steps):
    import torch
    import torch.nn.functional as F
    from parity_tests.reference.vision import VisionReference
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    state, heads, px, target, labels = case(width, layers, batch)
    ref = VisionReference(state, vision_config(width, layers))
    h = {k: torch.from_numpy(v) for k, v in heads.items()}
    weights = [w for k, w in ref.w.items() if ".post_layernorm." not in k] + list(h.values())
    for w in weights:
        w.requires_grad_(True)
    px_t, tgt, lab = torch.from_numpy(px), torch.from_numpy(target), torch.from_numpy(labels).long()
    g = VIEW // PATCH

    def step():  # WarmupNet.construct, term by term
        f = ref.tower(px_t)
        z = f.max(1).values @ h["head.weight"].T + h["head.bias"]
        loss = -(tgt * F.log_softmax(z, -1)).sum(-1).mean()
        per = -F.log_softmax(f @ h["dense.weight"].T + h["dense.bias"], -1).gather(2, lab[..., None])[..., 0]
        on = (lab < TAGS).float()
        off = 1 - on
        loss = loss + DENSE * (0.5 * (per * on).sum() / on.sum().clamp(min=1) +
                               0.5 * (per * off).sum() / off.sum().clamp(min=1))
        rgb = px_t.reshape(len(px), 3, g, PATCH, g, PATCH).mean((3, 5)).reshape(len(px), 3, g * g).transpose(1, 2)
        loss = loss + COLOUR * ((f @ h["colour.weight"].T + h["colour.bias"] - rgb) ** 2).mean()
        torch.autograd.grad(loss, weights)
        return float(loss)
    return _time(step, steps)


def _time(step, steps):
    loss = step()  # compilation / first allocation
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"loss": loss, "step_s": statistics.median(times), "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_tower", description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--contender", choices=("ms-jit", "torch-ref"), help=argparse.SUPPRESS)  # one child run
    a = ap.parse_args(argv)
    if min(a.width, a.layers, a.batch, a.steps, a.rounds) < 1 or a.width % 32:
        ap.error("--width must be a multiple of 32; --layers, --batch, --steps and --rounds >= 1")
    if a.contender:
        run = run_ms if a.contender == "ms-jit" else run_torch
        print(MARK + json.dumps(run(a.width, a.layers, a.batch, a.steps)), flush=True)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = {"ms-jit": [], "torch-ref": []}
    for r in range(a.rounds):
        for name in out:
            cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--width", str(a.width),
                   "--layers", str(a.layers), "--batch", str(a.batch), "--steps", str(a.steps)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
            line = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
            if p.returncode or not line:
                print(f"bench_tower: {name} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                return 1
            res = json.loads(line[-1][len(MARK):])
            out[name].append(res)
            print(f"round {r + 1} {name:9s} loss {res['loss']:.6f}  step {res['step_s']:.3f} s", flush=True)
    ms_s = statistics.median(x["step_s"] for x in out["ms-jit"])
    pt_s = statistics.median(x["step_s"] for x in out["torch-ref"])
    gap = abs(out["ms-jit"][0]["loss"] - out["torch-ref"][0]["loss"]) / abs(out["torch-ref"][0]["loss"])
    print(f"tower {a.width} x {a.layers}, batch {a.batch}: ms-jit {ms_s:.4f} s, torch-ref {pt_s:.4f} s a step; "
          f"speed vs torch-ref {pt_s / ms_s:.3f}x; loss relative gap {gap:.1e}")
    return 0 if gap < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default: build a small deterministic IXC2.5 checkpoint, load it, and chat about a drawn image."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

DEFAULT_DIR = os.path.join(os.getcwd(), "demo_out", "ixc25-tiny")

# Small but complete: every component of the real model at toy width (official key names and layout).
TINY_CONFIG = {
    "architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2",
    "vocab_size": 400, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 24576, "bias": False,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_length": 16384,
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 560, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}


def build_tiny_checkpoint(out_dir: str, seed: int = 0) -> str:
    """Write config.json, tokenizer.model and model.safetensors (official layout) with seeded random weights."""
    from ixc25_ms.weights.safetensors import write_safetensors
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.weights.spec import expected_parameters
    from ixc25_ms.tiny import train_tiny_tokenizer

    cfg = IXCConfig.from_dict(TINY_CONFIG)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_parameters(cfg).items():
        if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight",
                          "layernorm.weight")):
            arr = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            arr = np.zeros(shape, np.float32)
        else:
            arr = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        tensors[name] = ("F32", arr)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f, indent=2)
    train_tiny_tokenizer(os.path.join(out_dir, "tokenizer.model"), vocab_size=cfg.vocab_size)
    return out_dir


def draw_image(path: str) -> str:
    """A 700x300 picture (3 crops: 1,241 image tokens): sky, sun, a house."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (700, 300), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 220, 700, 300], fill=(70, 160, 70))
    d.ellipse([560, 30, 640, 110], fill=(250, 220, 60))
    d.rectangle([200, 140, 340, 230], fill=(200, 80, 60))
    d.polygon([(190, 140), (270, 80), (350, 140)], fill=(120, 60, 40))
    img.save(path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=DEFAULT_DIR, help="where the tiny checkpoint is written")
    ap.add_argument("--query", default="Describe this image in detail.")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--jit", action="store_true", help="compile prefill/decode/ViT with mindspore.jit")
    args = ap.parse_args(argv)
    times = {}
    t = time.perf_counter()
    import mindspore  # noqa: F401  (the import dominates start-up; timed here)
    import ixc25_ms
    times["import mindspore + ixc25_ms"] = time.perf_counter() - t
    t = time.perf_counter()
    build_tiny_checkpoint(args.dir)
    image = draw_image(os.path.join(args.dir, "demo.png"))
    times["build checkpoint + tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    model, tok = ixc25_ms.load(args.dir, use_jit=args.jit)
    times["load"] = time.perf_counter() - t
    print(f"model: {args.dir} (random weights, seed 0) — the answer below is nonsense by construction")
    print(f"user: {args.query}  [image: {image}]")
    print("assistant: ", end="", flush=True)
    t = time.perf_counter()
    pieces = []
    for piece in model.stream_chat(tok, args.query, [image], max_new_tokens=args.max_new_tokens, do_sample=False):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    times["chat (preprocess + ViT + prefill + decode)"] = time.perf_counter() - t
    for k in ("preprocess_s", "vision_s"):
        if k in model.timings:
            times["  of which " + k[:-2]] = model.timings[k]
    print("timings:")
    for k, v in times.items():
        print(f"  {k:45s} {v:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

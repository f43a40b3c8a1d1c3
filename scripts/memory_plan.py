"""Per-device memory of fine-tuning an IXC2.5 config: weights, gradients, AdamW states, activations (a formula).

The parameter counts come from the parameter spec of the config (ixc25_ms.weights.spec); activations from the
shapes a training step keeps for its backward pass. Used for the 7B table of notes/distributed.md, and checked
against measured peak RSS on the mid config (`--config mid --compare-measured MB`).
"""
from __future__ import annotations

import argparse
import json
import sys

GB = 1e9
SEVEN_B = dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8)


def counts(cfg) -> dict:
    """Parameters by role: all stored, trained in full fine-tuning (without the write/web LoRAs, which are never
    in the graph in base mode, and post_layernorm), and a PEFT LoRA of rank 64 on the five LLM linears."""
    import numpy as np
    from ixc25_ms.weights.spec import expected_parameters, linear_dims
    total = full = 0
    for k, shape in expected_parameters(cfg).items():
        n = int(np.prod(shape))
        total += n
        if not any(s in k for s in (".lora_sft_", ".lora_dpo_", ".lora_web_", "post_layernorm")):
            full += n
    lora = cfg.num_hidden_layers * sum(64 * (i + o) for i, o in linear_dims(cfg).values())
    return {"stored": total, "full": full, "lora": lora}


def activations(cfg, tokens: int, views: int, recompute: bool, flash: bool, act_bytes: int = 2) -> float:
    """Bytes a step keeps for the backward pass: per LLM layer the linears' and norms' inputs and the SwiGLU
    intermediates (~6 x hidden + 4 x intermediate values per token) and, with eager attention, the fp32 softmax
    (heads x L x L); the ViT the same per view. Recompute keeps only each layer's input, plus one layer's full
    activations at a time."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    v = cfg.vision
    tok_v = (v.image_size // v.patch_size) ** 2 + 1
    llm_layer = tokens * (6 * h + 4 * i) * act_bytes + (0 if flash else cfg.num_attention_heads * tokens ** 2 * 4)
    vit_layer = views * (tok_v * (6 * v.hidden_size + 2 * v.intermediate_size) * act_bytes
                         + (0 if flash else v.num_attention_heads * tok_v ** 2 * 4))
    if not recompute:
        return n * llm_layer + v.num_hidden_layers * vit_layer
    kept = n * tokens * h * act_bytes + v.num_hidden_layers * views * tok_v * v.hidden_size * act_bytes
    return kept + max(llm_layer, vit_layer)


def table(cfg, workers: int, weight_bytes: int, tokens_list, views: int, flash: bool) -> list:
    """Rows (setup, weights, master, grads, AdamW, activations at each length with / without recompute) in GB."""
    c = counts(cfg)
    rows = []
    for name, trained, shard in (("full, no sharding", c["full"], 1), ("full, ZeRO-1 (states sharded)", c["full"], workers),
                                 ("LoRA r64", c["lora"], 1)):
        master = 4 * trained / shard if weight_bytes < 4 else 0.0  # fp32 master copies under bf16/fp16
        rows.append(dict(setup=name, weights=weight_bytes * c["stored"] / GB, master=master / GB,
                         grads=4 * trained / GB, adamw=8 * trained / shard / GB,
                         act={t: (activations(cfg, t, views, False, flash) / GB, activations(cfg, t, views, True, flash) / GB)
                              for t in tokens_list}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memory_plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("7b", "mid"), default="7b")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--weight-bytes", type=int, default=2, help="2: bf16 weights (Ascend), 4: fp32 (CPU)")
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--views", type=int, default=19, help="ViT views per step (hd_num 18: 18 crops + global)")
    ap.add_argument("--flash", action="store_true", help="fused attention (no L x L scores kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.testing import DEFAULT_CFG
    cfg = IXCConfig.from_dict(SEVEN_B if args.config == "7b" else DEFAULT_CFG)
    toks = [int(t) for t in args.tokens.split(",")]
    rows = table(cfg, args.workers, args.weight_bytes, toks, args.views, args.flash)
    c = counts(cfg)
    print(f"parameters: stored {c['stored'] / 1e9:.3f} B, trained in full fine-tuning {c['full'] / 1e9:.3f} B, "
          f"LoRA r64 {c['lora'] / 1e6:.1f} M; {args.workers} workers; weights {args.weight_bytes} B/param")
    head = "| setup | weights | fp32 master | grads | AdamW | " + " | ".join(
        f"act {t} (recompute)" for t in toks) + " |"
    print(head + "\n|" + "---|" * (5 + len(toks)))
    for r in rows:
        acts = " | ".join(f"{a:.1f} ({b:.1f})" for a, b in r["act"].values())
        print(f"| {r['setup']} | {r['weights']:.1f} | {r['master']:.1f} | {r['grads']:.1f} | {r['adamw']:.1f} | {acts} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": c, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

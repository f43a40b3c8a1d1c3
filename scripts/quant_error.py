"""Per-layer error of weight-only int8 against fp32: every decoder layer's attention, MLP and output, and the logits.

Builds the bench's model (seeded weights, `--preset default` = the mid config), writes it once as an official
checkpoint, and runs the same input (token embeddings with an image span, so the partial LoRA is active) through:
- `fp32`: ixc25_ms.load as stored;
- `int8`: ixc25_ms.load(quantize="int8") — the shipped path (base linears and head int8 per output channel,
  partial LoRA and embeddings fp16);
- `int8+lora8`: the shipped int8 base plus the partial LoRA also rounded to int8 per output channel (simulated:
  fp32 model filled with dequantised weights), to show what quantising the LoRA would add;
- `sim-int8`: the same simulation of the shipped mode, a check that the kernels compute what the numbers say.
Prints a markdown table (relative Frobenius error vs fp32 per row) and writes it with `--out`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LORA_KEY = re.compile(r"model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])\.Plora_[AB]\.weight")


def fake_quant(state: dict, lora: bool) -> dict:
    """Base linears (and with `lora` the partial LoRA) -> dequantize(quantize_int8(w)); LoRA otherwise fp16."""
    from ixc25_ms.quantize import dequantize_int8, is_quantized_key, quantize_int8
    out = {}
    for k, v in state.items():
        if is_quantized_key(k) or (lora and LORA_KEY.fullmatch(k)):
            v = dequantize_int8(*quantize_int8(v))
        elif LORA_KEY.fullmatch(k) or k == "model.tok_embeddings.weight":
            v = v.astype(np.float16).astype(np.float32)
        out[k] = v
    return out


def rows_of(model, embeds: np.ndarray, im_mask: np.ndarray) -> dict:
    from mindspore import Tensor
    from ixc25_ms.parity import decoder_rows
    rows = {}
    decoder_rows(model, Tensor(embeds), im_mask, "base",
                 lambda name, t: rows.__setitem__(name, t.asnumpy().astype(np.float32)))
    rows["logits"] = model(inputs_embeds=Tensor(embeds), im_mask=im_mask).logits.asnumpy()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="quant_error", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("default", "quick"), default="default")
    ap.add_argument("--tokens", type=int, default=512, help="sequence length (the second quarter is image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(os.getcwd(), "bench_work"))
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    import ixc25_ms
    from ixc25_ms.parity.ms_side import build_ms_model
    from ixc25_ms.quantize import relative_error
    from ixc25_ms.testing import TinyModelTester
    from scripts.bench_presets import cached_checkpoint, preset_config
    cfg = preset_config(args.preset)
    path = cached_checkpoint(args.preset, cfg, args.seed, args.workdir)
    tester = TinyModelTester(cfg, seed=args.seed, init="bench")
    state = tester.state
    rng = np.random.default_rng(args.seed + 1)
    L = args.tokens
    ids = rng.integers(3, cfg["vocab_size"], size=L)
    embeds = state["model.tok_embeddings.weight"][ids][None].astype(np.float32)
    im_mask = np.zeros((1, L), bool)
    im_mask[0, L // 4: L // 2] = True
    embeds[0, L // 4: L // 2] = rng.standard_normal((L // 4, embeds.shape[-1])).astype(np.float32) * \
        float(embeds[0].std())  # an image span at text scale
    results, t0 = {}, time.perf_counter()
    for name in ("fp32", "int8", "sim-int8", "int8+lora8"):
        if name in ("fp32", "int8"):
            model, _ = ixc25_ms.load(path, quantize=None if name == "fp32" else "int8")
        else:
            model, _ = build_ms_model(path, "float32", False, weights=fake_quant(state, name == "int8+lora8"))
        results[name] = rows_of(model, embeds, im_mask)
        del model
        print(f"[quant_error] {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    ref = results["fp32"]
    cols = ("int8", "int8+lora8", "sim-int8")
    lines = [f"| row ({args.preset} config, {L} tokens, image span {L // 4}) | " + " | ".join(cols)
             + " | int8 vs sim-int8 |", "|---|" + "---|" * (len(cols) + 1)]
    for row in ref:
        errs = [relative_error(results[c][row], ref[row]) for c in cols]
        lines.append(f"| {row} | " + " | ".join(f"{e:.2e}" for e in errs)
                     + f" | {relative_error(results['int8'][row], results['sim-int8'][row]):.1e} |")
    f, q = ref["logits"][0], results["int8"]["logits"][0]
    s = np.sort(f, -1)
    clear = (s[:, -1] - s[:, -2]) > 0.01 * (s[:, -1] - s[:, 0])
    agree = float((q[clear].argmax(-1) == f[clear].argmax(-1)).mean()) if clear.any() else float("nan")
    lines.append("")
    lines.append(f"greedy ids (int8 vs fp32) agree at {agree:.1%} of the {int(clear.sum())} positions whose fp32 "
                 f"top-2 margin is clear (> 1 % of the row's logit range), {float((q.argmax(-1) == f.argmax(-1)).mean()):.1%} of all {L}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out + ".tmp", "w") as fh:
            fh.write(table + "\n")
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

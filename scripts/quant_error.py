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
`--model DIR --data JSON` measures a trained checkpoint instead (the embedded default model, say): each item's
first question with its picture, as chat builds the prompt, through fp32 and int8 (errors pooled over items).
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
    ap.add_argument("--model", default=None, help="a trained checkpoint directory instead of the preset's weights")
    ap.add_argument("--data", default=None, help="with --model: items (official conversation format) whose "
                    "first question and picture make the prompts")
    ap.add_argument("--limit", type=int, default=20, help="with --model: items used")
    args = ap.parse_args(argv)
    if args.model:
        if not args.data:
            ap.error("--model needs --data")
        return _emit(trained_model_table(args), args.out)
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
    return _emit("\n".join(lines), args.out)


def _emit(table: str, out) -> int:
    print(table)
    if out:
        with open(out + ".tmp", "w") as fh:
            fh.write(table + "\n")
        os.replace(out + ".tmp", out)
    return 0


def trained_model_table(args) -> str:
    """fp32 vs int8 of a trained checkpoint on real prompts: per-row errors pooled over the items (sqrt of summed
    squared differences over summed squared references), and greedy agreement at clear-margin positions."""
    import json
    import ixc25_ms
    from ixc25_ms.eval import _image_path
    with open(args.data, encoding="utf-8") as f:
        items = [it for it in json.load(f) if it.get("image")][:args.limit]
    fp32, tok = ixc25_ms.load(args.model)
    int8, _ = ixc25_ms.load(args.model, quantize="int8")
    num, den, agree, clear_n, total = {}, {}, 0, 0, 0
    for it in items:
        q = it["conversations"][0]["value"]
        wrapped, im_mask, _ = fp32.interleav_wrap_chat(q, [_image_path(it["image"], args.data)])
        embeds, m = wrapped["inputs_embeds"].asnumpy(), im_mask.asnumpy()
        ref, got = rows_of(fp32, embeds, m), rows_of(int8, embeds, m)  # the ViT is float in both: same embeds
        for row in ref:
            d = np.asarray(got[row], np.float64) - ref[row]
            num[row] = num.get(row, 0.0) + float((d * d).sum())
            den[row] = den.get(row, 0.0) + float((np.asarray(ref[row], np.float64) ** 2).sum())
        f, g = ref["logits"][0], got["logits"][0]
        s = np.sort(f, -1)
        clear = (s[:, -1] - s[:, -2]) > 0.01 * (s[:, -1] - s[:, 0])
        agree += int((g[clear].argmax(-1) == f[clear].argmax(-1)).sum())
        clear_n, total = clear_n + int(clear.sum()), total + len(f)
    lines = [f"| row ({args.model}, {len(items)} prompts, {total} positions) | int8 vs fp32 |", "|---|---|"]
    lines += [f"| {row} | {np.sqrt(num[row] / max(den[row], 1e-300)):.2e} |" for row in num]
    lines += ["", f"greedy ids (int8 vs fp32) agree at {agree} of the {clear_n} positions whose fp32 top-2 margin "
                  f"is clear (> 1 % of the row's logit range)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

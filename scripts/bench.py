"""ixc25-bench: MindSpore PyNative vs MindSpore jit vs our PyTorch reference, one config, side by side.

Each contender runs in its own worker process (so peak RSS is per contender) with the same seeded random
weights (weights/spec.py), the same image and prompt, and the same number of CPU threads. Repeats are
interleaved across contenders (round robin) so machine noise hits all of them alike.

Per contender: ViT ms per view (global view + crops, projector included), prefill tokens/s, decode
tokens/s, time to first token (ViT + prefill + first argmax), peak RSS, speed-ups against torch, and the
share of the decode physical bound = measured memory bandwidth / bytes of LLM weights read per token.
After the rounds, one paired decode (`--paired-chunk K`): the contenders take turns every K steps, and each
chunk's decode ratio against torch compares steps timed seconds apart.

MindSpore contenders load the same weights from a checkpoint directory with `ixc25_ms.load(...)`, as a user
does (built once and cached under --workdir; the write/web LoRAs stay on disk until a mode asks); quantised ones
(`ms-jit:int8`, `ms-pynative:fp16`, or `--quantize int8` for every MindSpore contender) count their own bytes
per token in their decode bound. `--preset 7b` runs the real 7B shape
from a shape-faithful bf16 fake official checkpoint (~22 GB on disk, built once), int8 contenders only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from ixc25_ms.testing import DEFAULT_CFG, QUICK_CFG, memory_bandwidth  # noqa: F401  (QUICK_CFG: tests)
from scripts.bench_presets import (BASE_CONTENDERS as CONTENDERS, PRESETS, cached_checkpoint, contender_name,
                                   decode_weight_bytes, parse_contender, preset_config)
from scripts.bench_workers import MARK


# ------------------------------------------------------------------------------------------ driver
class _Proc:
    def __init__(self, name, spec):
        self.name = name
        self.err = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, GLOG_v="3", OMP_NUM_THREADS=str(spec["threads"]))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.p = subprocess.Popen([sys.executable, "-m", "scripts.bench", "--worker", name, "--spec", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, cwd=root,
                                  env=env)

    def read(self):
        for line in self.p.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.err.seek(0)
        raise RuntimeError(f"worker {self.name} died (rc {self.p.wait()}):\n{self.err.read()[-4000:]}")

    def send(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()


def paired_decode(procs, names, steps: int, chunk: int, bandwidth) -> dict:
    """One more decode per contender, the contenders taking turns every `chunk` steps (order alternating), so
    that each chunk of one is timed within seconds of the same chunk of the others: per-chunk ratios then
    share the machine's phase, which the rounds (minutes apart) do not. `bandwidth()` (bytes/s) is sampled before the first chunk and after every chunk (workers idle meanwhile): out["bandwidth"] has
    len(chunks) + 1 samples, so each chunk's bound is measured in its own minutes. {} when chunk is 0."""
    if chunk <= 0 or steps <= 0:
        return {}
    out = {n: {"steps_s": [], "ids": [], "chunks": []} for n in names}
    for n in names:
        procs[n].send("pstart")
        procs[n].read()
    bw = [bandwidth()]
    for c, s0 in enumerate(range(0, steps, chunk)):
        k = min(chunk, steps - s0)
        for n in (names if c % 2 == 0 else names[::-1]):
            procs[n].send(f"psteps {k}")
            r = procs[n].read()
            out[n]["steps_s"] += r["steps_s"]
            out[n]["ids"] += r["ids"]
            out[n]["chunks"].append(r["steps_s"])
        bw.append(bandwidth())
    out["bandwidth"] = bw
    print(f"[bench] paired decode done ({steps} steps in chunks of {chunk})", file=sys.stderr)
    return out


def paired_pct_of_bound(chunks, bw, wbytes: int) -> list:
    """% of the decode bound per paired chunk: the chunk's tok/s over (bandwidth / weight bytes per token), the
    bandwidth being the higher of the samples just before and just after the chunk (the conservative bound)."""
    return [100 * (len(st) / sum(st)) / (max(bw[c], bw[c + 1]) / wbytes) for c, st in enumerate(chunks)]


def _stats(xs):
    return {"min": min(xs), "median": statistics.median(xs)}


def summarise(name, runs, ready, final, views, bound_tps, compile_note, warmup: int = 1):
    """One contender's numbers over its timed rounds (after `warmup` rounds). warmup 0: the timed round also
    compiled (jit), and its decode tok/s leaves out the first step (which compiled the decode graph)."""
    timed = runs[warmup:]
    L = timed[0]["L"]
    steps = [r["steps_s"][0 if warmup else 1:] for r in timed]
    vis = [r["vision_s"] * 1000 / views for r in timed]
    pre = [L / r["prefill_s"] for r in timed]
    dec = [len(st) / sum(st) if st else float("nan") for st in steps]
    ttft = [r["vision_s"] + r["prep_s"] + r["prefill_s"] for r in timed]
    step_ms = [statistics.median(st) * 1000 for st in steps if st]
    total = [r["vision_s"] + r["prep_s"] + r["prefill_s"] + sum(r["steps_s"]) for r in timed]
    out = {
        "vit_ms_per_view": _stats(vis), "prefill_tok_s": {"min": min(pre), "median": statistics.median(pre), "max": max(pre)},
        "decode_tok_s": {"min": min(dec), "median": statistics.median(dec), "max": max(dec)},
        "decode_tok_s_per_round": dec,
        "decode_step_ms_median": _stats(step_ms) if step_ms else None,
        "ttft_s": _stats(ttft), "total_s": _stats(total),
        "setup_s": ready["setup_s"], "rss_after_load_mb": ready["rss_after_load_mb"],
        "peak_rss_mb": final["peak_rss_mb"], "peak_rss_is_since_load": final["peak_since_load"],
        "peak_rss_process_mb": final.get("peak_rss_process_mb"),
        "prompt_len": L, "ids_first8": timed[0]["ids"][:8], "fused_cpu_decode_kernels": ready.get("cpu_kernels", False),
        "decode_pct_of_bound": 100 * statistics.median(dec) / bound_tps if dec[0] == dec[0] else None,
        "decode_bound_tok_s": bound_tps, "quantize": ready.get("quantize"), "load_report": ready.get("load_report"),
        "stages_s": {"setup": ready["setup_s"], "vit": statistics.median(r["vision_s"] for r in timed),
                     "prefill": statistics.median(r["prefill_s"] for r in timed),
                     "decode": statistics.median(sum(r["steps_s"]) for r in timed),
                     "first_decode_step": statistics.median(r["steps_s"][0] for r in timed if r["steps_s"])},
    }
    if warmup:
        warm = runs[warmup - 1]
        warm_total = warm["vision_s"] + warm["prep_s"] + warm["prefill_s"] + sum(warm["steps_s"])
        out.update(warmup_total_s=warm_total, warmup_minus_median_s=warm_total - statistics.median(total))
        if compile_note:
            out["compile_s_estimate"] = out["warmup_minus_median_s"]
    else:
        out["decode_excludes_first_step"] = True
    return out


def format_table(res) -> str:
    rows = [("contender", "ViT ms/view", "prefill tok/s", "decode tok/s", "step ms", "TTFT s", "% bound",
             "peak RSS MiB", "vs torch: ViT/prefill/decode")]
    ref = res["contenders"].get("torch-ref")
    for name, c in res["contenders"].items():
        vs = ""
        if ref:
            vs = "{:.2f}x / {:.2f}x / {:.2f}x".format(
                ref["vit_ms_per_view"]["median"] / c["vit_ms_per_view"]["median"],
                c["prefill_tok_s"]["median"] / ref["prefill_tok_s"]["median"],
                c["decode_tok_s"]["median"] / ref["decode_tok_s"]["median"])
        sm = c["decode_step_ms_median"]["median"] if c["decode_step_ms_median"] else float("nan")
        rows.append((name, "{:.1f}".format(c["vit_ms_per_view"]["median"]), "{:.0f}".format(c["prefill_tok_s"]["median"]),
                     "{:.2f}".format(c["decode_tok_s"]["median"]), "{:.1f}".format(sm),
                     "{:.2f}".format(c["ttft_s"]["median"]), "{:.0f}%".format(c["decode_pct_of_bound"] or 0),
                     "{:.0f}".format(c["peak_rss_mb"]), vs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(r[i].ljust(widths[i]) for i in range(len(r))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ixc25-bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny config for tests/CI (seconds, not minutes); = --preset quick")
    ap.add_argument("--preset", choices=PRESETS, default=None,
                    help="default (mid config), quick (tiny) or 7b (the real shape from a cached bf16 fake "
                         "checkpoint, int8 contenders only)")
    ap.add_argument("--quantize", choices=("int8", "fp16"), default=None,
                    help="weight-only quantisation for MindSpore contenders without a :quant suffix")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 128, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up (default 3, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, choices=(0, 1),
                    help="warm-up rounds (default 1; 7b: 0, the timed round then includes compiling)")
    ap.add_argument("--text-tokens", type=int, default=20, help="text ids after the image in the prompt")
    ap.add_argument("--image", default="700x300", help="WIDTHxHEIGHT of the synthetic image")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every contender")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help="comma list of " + ",".join(CONTENDERS) + ", MindSpore ones optionally name:int8 or name:fp16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "ixc25_ms", "bench"),
                    help="where checkpoints for quantised contenders are built once and kept (7b: ~22 GB)")
    ap.add_argument("--paired-chunk", type=int, default=None, metavar="K",
                    help="after the rounds, decode once more with the contenders taking turns every K steps "
                         "(default 16, --quick 2, 7b 0; 0 = off): paired ratios against torch-ref that share the "
                         "machine's phase")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-' for stdout)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from scripts.bench_workers import worker_main
        return worker_main(args.worker, json.loads(args.spec))

    preset = args.preset or ("quick" if args.quick else "default")
    try:
        parsed = [parse_contender(n, args.quantize) for n in args.contenders.split(",") if n]
    except ValueError as e:
        ap.error(str(e))
    names = [contender_name(b, q) for b, q in parsed]
    if preset == "7b" and any(q != "int8" for _, q in parsed):
        ap.error("--preset 7b runs int8 MindSpore contenders only (float weights of the 7B do not fit in memory)")
    repeats = args.repeats if args.repeats is not None else (2 if preset == "quick" else 1 if preset == "7b" else 3)
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if preset in ("quick", "7b") else 128)
    warmup = args.warmup if args.warmup is not None else (0 if preset == "7b" else 1)
    if repeats < 1 or new_tokens < 2 + (warmup == 0):
        ap.error("--repeats must be >= 1 and --new-tokens >= 2 (3 without warm-up)")
    chunk = args.paired_chunk if args.paired_chunk is not None else {"quick": 2, "7b": 0}.get(preset, 16)
    if chunk < 0:
        ap.error("--paired-chunk must be >= 0")
    w, h = (int(v) for v in args.image.lower().split("x"))
    cfg_dict = preset_config(preset)
    from ixc25_ms.config import IXCConfig
    cfg = IXCConfig.from_dict(cfg_dict)
    ckpt = None
    if any(b.startswith("ms") for b, _ in parsed) or preset == "7b":  # MindSpore contenders load it as a user would
        ckpt = cached_checkpoint(preset, cfg_dict, args.seed, args.workdir)
    dtype_bytes = 2 if args.dtype == "float16" else 4
    wbytes = {n: decode_weight_bytes(cfg, dtype_bytes, q) for n, (_, q) in zip(names, parsed)}

    def sample_bandwidth():
        return memory_bandwidth(64 if preset == "quick" else 256)
    bw = [sample_bandwidth()]

    procs = {}
    for n, (base, q) in zip(names, parsed):
        spec = dict(cfg=cfg_dict, threads=args.threads, dtype=args.dtype, seed=args.seed, new_tokens=new_tokens,
                    text_tokens=args.text_tokens, image=[w, h], quantize=q, ckpt=ckpt if base.startswith("ms") else None)
        procs[n] = _Proc(base, spec)
    ready = {n: p.read() for n, p in procs.items()}
    runs = {n: [] for n in names}
    try:
        for rep in range(repeats + warmup):  # warm-up + repeats, round robin
            order = names if rep % 2 == 0 else names[::-1]
            for n in order:
                procs[n].send("run")
                runs[n].append(procs[n].read())
            print(f"[bench] round {rep + 1 - warmup}/{repeats} done" + (" (warm-up)" if rep < warmup else ""),
                  file=sys.stderr)
        paired = paired_decode(procs, names, new_tokens - 1, chunk, sample_bandwidth)
        final = {}
        for n, p in procs.items():
            p.send("quit")
            final[n] = p.read()
            p.p.wait()
    finally:
        for p in procs.values():
            if p.p.poll() is None:
                p.p.kill()
    bw.append(sample_bandwidth())
    bandwidth = max(bw)
    bound = {n: bandwidth / wbytes[n] for n in names}
    views = ready[names[0]]["views"]
    res = {
        "config": {"preset": preset, "llm_vit": cfg_dict, "dtype": args.dtype,
                   "threads": args.threads, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                   "image": args.image, "vit_views": views, "text_tokens": args.text_tokens, "checkpoint": ckpt},
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "loadavg_1m_start_end": None},
        "bandwidth_GBps": bandwidth / 1e9, "bandwidth_samples_GBps": [b / 1e9 for b in bw],
        "decode_weight_bytes_per_token": decode_weight_bytes(cfg, dtype_bytes),
        "decode_bound_tok_s": bandwidth / decode_weight_bytes(cfg, dtype_bytes),
        "contenders": {n: summarise(n, runs[n], ready[n], final[n], views, bound[n], n.startswith("ms-jit"), warmup)
                       for n in names},
    }
    for n, c in res["contenders"].items():
        c["decode_weight_bytes_per_token"] = wbytes[n]
    _ratios(res, runs, paired, names, chunk, wbytes, warmup)
    res["machine"]["loadavg_1m_start_end"] = [_LOAD0, os.getloadavg()[0]]
    _print(res, args, names, new_tokens, repeats, chunk)
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


_LOAD0 = os.getloadavg()[0]


def _ratios(res, runs, paired, names, chunk, wbytes, warmup):
    """Per-round and paired-chunk ratios against torch-ref and against the float MindSpore contender of the
    same mode (ms-jit:int8 vs ms-jit), the paired % of each contender's own bound, greedy-id agreement."""
    cs = res["contenders"]
    ref = cs.get("torch-ref")
    for n, c in cs.items():
        if ref:  # each round's contenders ran within minutes of each other
            c["decode_vs_torch_per_round"] = [a / b for a, b in zip(c["decode_tok_s_per_round"],
                                                                   ref["decode_tok_s_per_round"])]
        base = n.split(":")[0]
        if ":" in n and base in cs:
            c[f"decode_vs_{base}_per_round"] = [a / b for a, b in zip(c["decode_tok_s_per_round"],
                                                                     cs[base]["decode_tok_s_per_round"])]
            c[f"ids_equal_{base}_first8"] = c["ids_first8"] == cs[base]["ids_first8"]
        if n in paired:
            c["paired_decode_steps_s"] = paired[n]["steps_s"]
            c["paired_ids_equal_rounds"] = paired[n]["ids"] == runs[n][warmup]["ids"][1:1 + len(paired[n]["ids"])]
            c["decode_pct_of_bound_paired_chunks"] = paired_pct_of_bound(paired[n]["chunks"], paired["bandwidth"],
                                                                         wbytes[n])
            for other in ("torch-ref", base):
                if other != n and other in paired:
                    c[f"decode_vs_{other}_paired_chunks"] = [sum(t) / sum(m) for t, m in zip(
                        paired[other]["chunks"], paired[n]["chunks"])]
            if "decode_vs_torch-ref_paired_chunks" in c:
                c["decode_vs_torch_paired_chunks"] = c.pop("decode_vs_torch-ref_paired_chunks")
    res["paired_chunk_steps"] = chunk
    res["paired_bandwidth_samples_GBps"] = [b / 1e9 for b in paired.get("bandwidth", [])]
    floats = [c["ids_first8"] for n, c in cs.items() if ":" not in n]
    res["greedy_ids_agree_first8"] = len({tuple(i) for i in floats}) <= 1  # float contenders (quantised: above)


def _print(res, args, names, new_tokens, repeats, chunk):
    cs = res["contenders"]
    c0 = cs[names[0]]
    print(f"config: {res['config']['preset']} {args.dtype}, threads {args.threads}, prompt {c0['prompt_len']} "
          f"tokens ({res['config']['vit_views']} ViT views), {new_tokens} new tokens, {res['config']['warmup']} "
          f"warm-up + {repeats} repeats (medians); load average {res['machine']['loadavg_1m_start_end']}")
    print(f"memory bandwidth {res['bandwidth_GBps']:.2f} GB/s; bound per contender: "
          + ", ".join(f"{n} {c['decode_weight_bytes_per_token'] / 1e6:.1f} MB/token -> {c['decode_bound_tok_s']:.2f} "
                      f"tok/s" for n, c in cs.items()))
    print(format_table(res))
    for n, c in cs.items():
        for key, label in (("decode_vs_torch_per_round", "torch"), (f"decode_vs_{n.split(':')[0]}_per_round",
                                                                    n.split(":")[0])):
            r = c.get(key)
            if r and n != "torch-ref" and n != label:
                print(f"{n} decode vs {label} per round: " + " ".join(f"{x:.2f}x" for x in r)
                      + f" (median {statistics.median(r):.2f}x)")
        for key, label in (("decode_vs_torch_paired_chunks", "torch"),
                           (f"decode_vs_{n.split(':')[0]}_paired_chunks", n.split(":")[0])):
            r = c.get(key)
            if r:
                print(f"{n} decode vs {label} in paired chunks of {chunk} steps: median {statistics.median(r):.2f}x, "
                      f"range {min(r):.2f}-{max(r):.2f}x over {len(r)} chunks")
        p = c.get("decode_pct_of_bound_paired_chunks")
        if p:
            b = res["paired_bandwidth_samples_GBps"]
            print(f"{n} % of its decode bound in paired chunks (bandwidth {min(b):.1f}-{max(b):.1f} GB/s): median "
                  f"{statistics.median(p):.0f}%, range {min(p):.0f}-{max(p):.0f}%")
        st = c["stages_s"]
        print(f"{n} stages (median s): setup {st['setup']:.1f}, ViT {st['vit']:.2f}, prefill {st['prefill']:.2f}, "
              f"decode {st['decode']:.2f} (first step {st['first_decode_step']:.2f}); peak RSS {c['peak_rss_mb']:.0f} "
              f"MiB since load, {c['peak_rss_process_mb'] or 0:.0f} MiB process")
    fused = [n for n, c in cs.items() if c["fused_cpu_decode_kernels"]]
    print(f"fused CPU decode kernels (IXC25_CPU_KERNELS): {', '.join(fused) if fused else 'none'}")
    for n, c in cs.items():
        if "compile_s_estimate" in c:
            print(f"{n} compile (warm-up minus median run): {c['compile_s_estimate']:.2f} s")
    print(f"greedy ids agree across float contenders (first 8): {res['greedy_ids_agree_first8']}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())

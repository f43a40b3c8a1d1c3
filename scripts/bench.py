"""ixc25-bench: MindSpore PyNative vs MindSpore jit vs our PyTorch reference, one config, side by side.

Each contender runs in its own worker process (so peak RSS is per contender) with the same seeded random
weights (weights/spec.py), the same image and prompt, and the same number of CPU threads. Repeats are
interleaved across contenders (round robin) so machine noise hits all of them alike.

Per contender: ViT ms per view (global view + crops, projector included), prefill tokens/s, decode
tokens/s, time to first token (ViT + prefill + first argmax), peak RSS, speed-ups against torch, and the
share of the decode physical bound = measured memory bandwidth / bytes of LLM weights read per token.
After the rounds, one paired decode (`--paired-chunk K`): the contenders take turns every K steps, and each
chunk's decode ratio against torch compares steps timed seconds apart.
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
from scripts.bench_workers import MARK

CONTENDERS = ("ms-pynative", "ms-jit", "torch-ref")


def decode_weight_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes of weights one decoded token must read: every LLM linear (base mode: no LoRA) + output head."""
    from ixc25_ms.weights.spec import linear_dims
    per_layer = sum(i * o for i, o in linear_dims(cfg).values())
    return (cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size) * dtype_bytes


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


def summarise(name, runs, ready, final, views, bound_tps, compile_note):
    warm, timed = runs[0], runs[1:]
    L = timed[0]["L"]
    vis = [r["vision_s"] * 1000 / views for r in timed]
    pre = [L / r["prefill_s"] for r in timed]
    dec = [len(r["steps_s"]) / sum(r["steps_s"]) if r["steps_s"] else float("nan") for r in timed]
    ttft = [r["vision_s"] + r["prep_s"] + r["prefill_s"] for r in timed]
    step_ms = [statistics.median(r["steps_s"]) * 1000 for r in timed if r["steps_s"]]
    total = [r["vision_s"] + r["prep_s"] + r["prefill_s"] + sum(r["steps_s"]) for r in timed]
    warm_total = warm["vision_s"] + warm["prep_s"] + warm["prefill_s"] + sum(warm["steps_s"])
    out = {
        "vit_ms_per_view": _stats(vis), "prefill_tok_s": {"min": min(pre), "median": statistics.median(pre), "max": max(pre)},
        "decode_tok_s": {"min": min(dec), "median": statistics.median(dec), "max": max(dec)},
        "decode_tok_s_per_round": dec,
        "decode_step_ms_median": _stats(step_ms) if step_ms else None,
        "ttft_s": _stats(ttft), "total_s": _stats(total),
        "warmup_total_s": warm_total, "warmup_minus_median_s": warm_total - statistics.median(total),
        "setup_s": ready["setup_s"], "rss_after_load_mb": ready["rss_after_load_mb"],
        "peak_rss_mb": final["peak_rss_mb"], "peak_rss_is_since_load": final["peak_since_load"],
        "prompt_len": L, "ids_first8": timed[0]["ids"][:8], "fused_cpu_decode_kernels": ready.get("cpu_kernels", False),
        "decode_pct_of_bound": 100 * statistics.median(dec) / bound_tps if dec[0] == dec[0] else None,
    }
    if compile_note:
        out["compile_s_estimate"] = out["warmup_minus_median_s"]
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
    ap.add_argument("--quick", action="store_true", help="tiny config for tests/CI (seconds, not minutes)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 128, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 3, --quick 2)")
    ap.add_argument("--text-tokens", type=int, default=20, help="text ids after the image in the prompt")
    ap.add_argument("--image", default="700x300", help="WIDTHxHEIGHT of the synthetic image")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every contender")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list of " + ",".join(CONTENDERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paired-chunk", type=int, default=None, metavar="K",
                    help="after the rounds, decode once more with the contenders taking turns every K steps "
                         "(default 16, --quick 2; 0 = off): paired ratios against torch-ref that share the "
                         "machine's phase")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-' for stdout)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from scripts.bench_workers import worker_main
        return worker_main(args.worker, json.loads(args.spec))

    names = [n for n in args.contenders.split(",") if n]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        ap.error(f"unknown contender(s) {bad}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.quick else 128)
    if repeats < 1 or new_tokens < 2:
        ap.error("--repeats must be >= 1 and --new-tokens >= 2")
    chunk = args.paired_chunk if args.paired_chunk is not None else (2 if args.quick else 16)
    if chunk < 0:
        ap.error("--paired-chunk must be >= 0")
    w, h = (int(v) for v in args.image.lower().split("x"))
    cfg_dict = QUICK_CFG if args.quick else DEFAULT_CFG
    spec = dict(cfg=cfg_dict, threads=args.threads, dtype=args.dtype, seed=args.seed, new_tokens=new_tokens,
                text_tokens=args.text_tokens, image=[w, h])
    from ixc25_ms.config import IXCConfig
    cfg = IXCConfig.from_dict(cfg_dict)
    dtype_bytes = 2 if args.dtype == "float16" else 4
    wbytes = decode_weight_bytes(cfg, dtype_bytes)
    def sample_bandwidth():
        return memory_bandwidth(64 if args.quick else 256)
    bw = [sample_bandwidth()]

    procs = {n: _Proc(n, spec) for n in names}
    ready = {n: p.read() for n, p in procs.items()}
    runs = {n: [] for n in names}
    try:
        for rep in range(repeats + 1):  # warm-up + repeats, round robin
            order = names if rep % 2 == 0 else names[::-1]
            for n in order:
                procs[n].send("run")
                runs[n].append(procs[n].read())
            print(f"[bench] round {rep}/{repeats} done" + (" (warm-up)" if rep == 0 else ""), file=sys.stderr)
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
    bound_tps = bandwidth / wbytes
    views = ready[names[0]]["views"]
    res = {
        "config": {"preset": "quick" if args.quick else "default", "llm_vit": cfg_dict, "dtype": args.dtype,
                   "threads": args.threads, "new_tokens": new_tokens, "repeats": repeats, "warmup": 1,
                   "image": args.image, "vit_views": views, "text_tokens": args.text_tokens},
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model()},
        "bandwidth_GBps": bandwidth / 1e9, "bandwidth_samples_GBps": [b / 1e9 for b in bw],
        "decode_weight_bytes_per_token": wbytes, "decode_bound_tok_s": bound_tps,
        "contenders": {n: summarise(n, runs[n], ready[n], final[n], views, bound_tps, n == "ms-jit") for n in names},
    }
    ref = res["contenders"].get("torch-ref")
    for n, c in res["contenders"].items():
        if ref:  # each round's contenders ran within minutes of each other
            c["decode_vs_torch_per_round"] = [a / b for a, b in zip(c["decode_tok_s_per_round"],
                                                                   ref["decode_tok_s_per_round"])]
        if n in paired:
            c["paired_decode_steps_s"] = paired[n]["steps_s"]
            c["paired_ids_equal_rounds"] = paired[n]["ids"] == runs[n][1]["ids"][1:1 + len(paired[n]["ids"])]
            c["decode_pct_of_bound_paired_chunks"] = paired_pct_of_bound(paired[n]["chunks"], paired["bandwidth"], wbytes)
            if ref and "torch-ref" in paired and n != "torch-ref":
                c["decode_vs_torch_paired_chunks"] = [sum(t) / sum(m) for t, m in zip(paired["torch-ref"]["chunks"],
                                                                                      paired[n]["chunks"])]
    res["paired_chunk_steps"] = chunk
    res["paired_bandwidth_samples_GBps"] = [b / 1e9 for b in paired.get("bandwidth", [])]
    same = len({tuple(c["ids_first8"]) for c in res["contenders"].values()}) == 1
    res["greedy_ids_agree_first8"] = same
    print(f"config: {res['config']['preset']} {args.dtype}, threads {args.threads}, prompt {res['contenders'][names[0]]['prompt_len']} "
          f"tokens ({views} ViT views), {new_tokens} new tokens, 1 warm-up + {repeats} repeats (medians)")
    print(f"memory bandwidth {bandwidth / 1e9:.2f} GB/s; decode reads {wbytes / 1e6:.1f} MB of weights per token; "
          f"bound {bound_tps:.2f} tok/s")
    print(format_table(res))
    for n, c in res["contenders"].items():
        if ref and n != "torch-ref":
            r = c["decode_vs_torch_per_round"]
            print(f"{n} decode vs torch per round (same round, interleaved): "
                  + " ".join(f"{x:.2f}x" for x in r) + f" (median {statistics.median(r):.2f}x)")
            r = c.get("decode_vs_torch_paired_chunks")
            if r:
                print(f"{n} decode vs torch in paired chunks of {chunk} steps (turns taken, same minutes): median "
                      f"{statistics.median(r):.2f}x, range {min(r):.2f}-{max(r):.2f}x over {len(r)} chunks")
        p = c.get("decode_pct_of_bound_paired_chunks")
        if p:
            b = res["paired_bandwidth_samples_GBps"]
            print(f"{n} % of the decode bound in paired chunks (bandwidth sampled between chunks, {min(b):.1f}-"
                  f"{max(b):.1f} GB/s): median {statistics.median(p):.0f}%, range {min(p):.0f}-{max(p):.0f}%")
    fused = [n for n, c in res["contenders"].items() if c["fused_cpu_decode_kernels"]]
    print(f"fused CPU decode kernels (IXC25_CPU_KERNELS): {', '.join(fused) if fused else 'none'}")
    if "ms-jit" in res["contenders"]:
        print(f"ms-jit compile (warm-up minus median run): {res['contenders']['ms-jit']['compile_s_estimate']:.2f} s")
    print(f"greedy ids agree across contenders (first 8): {same}")
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


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

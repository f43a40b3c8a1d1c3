"""Benchmark ixc25-convert on a shape-faithful fake of the real 7B (bf16): MB/s vs a plain copy, peak RSS."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from converters.units import human, parse_size  # noqa: E402
from ixc25_ms.config import IXCConfig  # noqa: E402
from ixc25_ms.weights.safetensors import write_safetensors  # noqa: E402
from ixc25_ms.weights.spec import expected_parameters  # noqa: E402
from ixc25_ms.weights.tags import f32_to_bf16  # noqa: E402

# spec §9 (UNVERIFIED values of the real config.json; shapes are what matters here)
REAL_7B = {
    "architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2", "bias": False,
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 92544, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 24576,
    "max_length": 16384, "torch_dtype": "bfloat16",
}


def fake_checkpoint(dst: str, layers: int, shard_size: int, seed: int = 0) -> dict:
    """Official-layout bf16 checkpoint: real key names and shapes, layers 0..layers-1, random weights."""
    cfg_d = dict(REAL_7B, num_hidden_layers=layers)
    shapes = expected_parameters(IXCConfig.from_dict(cfg_d))
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg_d, f, indent=1)
    tok = os.path.join(REPO, "tests", "data", "internlm2-tokenizer.model")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(dst, "tokenizer.model"))
    rng = np.random.default_rng(seed)
    pool = f32_to_bf16((rng.standard_normal(1 << 25) * 0.02).astype(np.float32))  # 64 MB of bf16 values
    groups, cur, size = [], [], 0
    for k, s in shapes.items():
        nb = int(np.prod(s)) * 2
        if cur and size + nb > shard_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    groups.append(cur)
    wm, sizes = {}, []
    for i, keys in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            n = int(np.prod(shapes[k]))
            a = np.empty(n, np.uint16)
            for j in range(0, n, pool.size):
                m = min(pool.size, n - j)
                off = int(rng.integers(0, pool.size - m + 1))
                a[j:j + m] = pool[off:off + m]
            tensors[k] = ("BF16", a.reshape(shapes[k]))
        write_safetensors(os.path.join(dst, fn), tensors, {"format": "pt"}, fsync=True)
        sizes.append(os.path.getsize(os.path.join(dst, fn)))
        wm.update({k: fn for k in keys})
        del tensors
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())},
                   "weight_map": wm}, f)
    return {"files": len(groups), "bytes": sum(sizes), "largest_shard": max(sizes), "tensors": len(shapes)}


def plain_copy(src: str, dst: str) -> tuple:
    """(seconds, CPU seconds) to copy every file of src and fsync them (cp -r + sync; the converter fsyncs
    its output too)."""
    os.makedirs(dst)
    c0 = os.times()
    t = time.perf_counter()
    names = sorted(os.listdir(src))
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    for name in names:
        fd = os.open(os.path.join(dst, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    c1 = os.times()
    return time.perf_counter() - t, (c1.user - c0.user) + (c1.system - c0.system)


def run_convert(args: list) -> tuple:
    """(seconds, peak RSS bytes, CPU seconds) of one ixc25-convert run in a child process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "converters.cli"] + args, cwd=REPO)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"bench_convert: ixc25-convert failed with exit code {p.returncode}")
    return dt, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime  # ru_maxrss is in KiB on Linux


def warm(src: str) -> float:
    """Read every file of src once so that each timed run starts with the source in the page cache."""
    t, buf = time.perf_counter(), bytearray(16 << 20)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def _stats(xs: list) -> str:
    return f"min {min(xs):.1f}s / median {statistics.median(xs):.1f}s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4, help="LLM decoder layers to fake (the real model has 32)")
    ap.add_argument("--workdir", default="/tmp/ixc25-bench-convert")
    ap.add_argument("--src-shard-size", default="2GB", help="shard size of the fake official checkpoint")
    ap.add_argument("--shard-size", default="2GB", help="--shard-size passed to ixc25-convert")
    ap.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"))
    ap.add_argument("--rounds", type=int, default=3, help="copy, convert pairs, interleaved")
    ap.add_argument("--to-torch", action="store_true", help="also time the way back (once)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    if os.path.exists(a.workdir):
        raise SystemExit(f"bench_convert: {a.workdir} exists; remove it or pick another --workdir")
    one = expected_parameters(IXCConfig.from_dict(dict(REAL_7B, num_hidden_layers=1)))
    per_layer = sum(int(np.prod(s)) * 2 for k, s in one.items() if k.startswith("model.layers.0."))
    rest = sum(int(np.prod(s)) * 2 for k, s in one.items() if not k.startswith("model.layers."))
    est = rest + a.layers * per_layer
    copies = 2 + int(a.to_torch)
    parent = os.path.dirname(os.path.abspath(a.workdir))
    free = shutil.disk_usage(parent).free
    print(f"fake 7B: {a.layers}/32 LLM layers, {human(est)} bf16 (full model {human(rest + 32 * per_layer)}); "
          f"needs {human(copies * est)} on {parent}, {human(free)} free")
    if free < copies * est * 1.05:
        raise SystemExit("bench_convert: not enough disk space; lower --layers")
    src, cp, dst, back = (os.path.join(a.workdir, n) for n in ("official", "copy", "ms", "back"))
    try:
        t = time.perf_counter()
        # in a child process: a forked converter's ru_maxrss would otherwise include this process's RSS
        out = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                              "from scripts.bench_convert import fake_checkpoint; "
                              "print(json.dumps(fake_checkpoint(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))",
                              REPO, src, str(a.layers), str(parse_size(a.src_shard_size))],
                             check=True, capture_output=True, text=True).stdout
        info = json.loads(out.strip().splitlines()[-1])
        print(f"wrote fake: {info['tensors']} tensors, {info['files']} shard(s), {human(info['bytes'])}, "
              f"largest shard {human(info['largest_shard'])} ({time.perf_counter() - t:.1f}s)")
        total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        load0 = os.getloadavg()[0]
        t_copy, cpu_copy, t_conv, cpu_conv, rss, t_write = [], [], [], [], [], []
        for r in range(a.rounds):
            # copy, then convert; each starts from a source read just before (page cache warm for both) and
            # ends with its output fsynced; the previous output is deleted first
            for what in ("copy", "convert"):
                shutil.rmtree(cp, ignore_errors=True)
                shutil.rmtree(dst, ignore_errors=True)
                os.sync()
                warm(src)
                if what == "copy":
                    dt, cpu = plain_copy(src, cp)
                    t_copy.append(dt)
                    cpu_copy.append(cpu)
                else:
                    dt, peak, cpu = run_convert(["--src", src, "--dst", dst, "--shard-size", a.shard_size,
                                                 "--format", a.format, "--quiet"])
                    with open(os.path.join(dst, "conversion.json")) as f:
                        t_write.append(json.load(f)["seconds"]["write"])
                    t_conv.append(dt)
                    cpu_conv.append(cpu)
                    rss.append(peak)
                print(f"  round {r + 1} {what:8s} {dt:6.1f}s  {total / dt / 1e6:5.0f} MB/s  load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        load1 = os.getloadavg()[0]
        out_sizes = [os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.startswith("ms_model-")]
        m_copy, m_conv = statistics.median(t_copy), statistics.median(t_conv)
        largest = max(info["largest_shard"], max(out_sizes))
        print(f"machine: {os.cpu_count()} CPUs, load average {load0:.1f} before / {load1:.1f} after; "
              f"source in page cache for every run, outputs fsynced")
        print(f"plain copy (copyfile+fsync), {a.rounds} runs: {_stats(t_copy)} -> {total / m_copy / 1e6:.0f} MB/s "
              f"(median); CPU median {statistics.median(cpu_copy):.1f}s")
        print(f"ixc25-convert ({a.format}), {a.rounds} runs: {_stats(t_conv)} -> {total / m_conv / 1e6:.0f} MB/s "
              f"(median); write phase median {statistics.median(t_write):.1f}s; CPU median "
              f"{statistics.median(cpu_conv):.1f}s")
        print(f"ratio of medians: convert = {100 * m_copy / m_conv:.0f}% of copy speed "
              f"(per round: {', '.join(f'{100 * c / v:.0f}%' for c, v in zip(t_copy, t_conv))}; "
              f"min vs min {100 * min(t_copy) / min(t_conv):.0f}%)")
        print(f"peak RSS max {human(max(rss))}; largest shard {human(largest)} (source "
              f"{human(info['largest_shard'])}, output {human(max(out_sizes))}); peak - largest shard = "
              f"{human(max(rss) - largest)} (goal <= 1 GB)")
        if a.to_torch:
            shutil.rmtree(cp, ignore_errors=True)
            warm(dst)
            t_back, rss_back, _ = run_convert(["--src", dst, "--dst", back, "--to-torch", "--quiet",
                                               "--shard-size", a.shard_size])
            print(f"--to-torch: {t_back:.1f}s -> {total / t_back / 1e6:.0f} MB/s, peak RSS {human(rss_back)}")
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

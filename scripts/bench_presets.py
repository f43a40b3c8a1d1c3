"""ixc25-bench presets and contenders: configs, `name[:quant]` specs, bytes per decoded token, cached checkpoints."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONTENDERS = ("ms-pynative", "ms-jit", "torch-ref")
QUANTS = ("int8", "fp16")
PRESETS = ("default", "quick", "7b")
TOKENIZER = os.path.join(REPO, "tests", "data", "internlm2-tokenizer.model")
DONE = ".complete"  # marker written last into a cached checkpoint directory


def preset_config(preset: str) -> dict:
    """The config dict of a preset: the bench's mid config, the tiny --quick one, or the real 7B shape
    (scripts/bench_convert.REAL_7B, the default vision tower: CLIP ViT-L/14-560, 24 layers)."""
    from ixc25_ms.testing import DEFAULT_CFG, QUICK_CFG
    if preset == "7b":
        from scripts.bench_convert import REAL_7B
        return dict(REAL_7B)
    return dict(QUICK_CFG if preset == "quick" else DEFAULT_CFG)


def parse_contender(spec: str, default_quant: Optional[str]) -> Tuple[str, Optional[str]]:
    """'ms-jit', 'ms-jit:int8', 'torch-ref' -> (base name, quantisation or None); MindSpore contenders without
    a suffix take `default_quant` (--quantize). ValueError for an unknown name or quantisation."""
    base, _, quant = spec.partition(":")
    if base not in BASE_CONTENDERS:
        raise ValueError(f"unknown contender {base!r} (one of {', '.join(BASE_CONTENDERS)})")
    if quant and quant not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r} in {spec!r} (one of {', '.join(QUANTS)})")
    if base == "torch-ref":
        if quant:
            raise ValueError("torch-ref runs float weights only")
        return base, None
    return base, quant or default_quant


def contender_name(base: str, quant: Optional[str]) -> str:
    return f"{base}:{quant}" if quant else base


def decode_weight_bytes(cfg, dtype_bytes: int, quantize: Optional[str] = None) -> int:
    """Bytes of weights one decoded token must read: every LLM linear (base mode: no LoRA) + output head;
    int8: one byte per weight plus a 4-byte scale per output row; fp16: two bytes per weight."""
    from ixc25_ms.weights.spec import linear_dims
    dims = linear_dims(cfg)
    weights = cfg.num_hidden_layers * sum(i * o for i, o in dims.values()) + cfg.vocab_size * cfg.hidden_size
    if quantize == "int8":
        rows = cfg.num_hidden_layers * sum(o for _, o in dims.values()) + cfg.vocab_size
        return weights + 4 * rows
    return weights * (2 if quantize == "fp16" else dtype_bytes)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def check_disk(parent: str, need: int, what: str) -> None:
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need * 1.05:
        raise SystemExit(f"ixc25-bench: {what} needs {need / 1e9:.1f} GB on {parent}, {free / 1e9:.1f} GB free")


def cached_checkpoint(preset: str, cfg_dict: dict, seed: int, workdir: str) -> str:
    """An official-layout checkpoint directory of the preset's model, built once under `workdir` and reused:
    7b a shape-faithful bf16 fake of the real model (sharded safetensors, real keys and shapes, random
    weights: scripts/bench_convert.fake_checkpoint, ~22 GB), the others the bench's seeded fp32 weights
    (the in-memory contenders' very values). Built in a child process, under a temporary name."""
    key = _key({"preset": preset, "cfg": cfg_dict, "seed": seed, "v": 1})
    path = os.path.join(workdir, f"{preset}-{key}")
    if os.path.isfile(os.path.join(path, DONE)):
        return path
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.weights.spec import num_parameters
    n = num_parameters(IXCConfig.from_dict(cfg_dict))
    check_disk(workdir, n * (2 if preset == "7b" else 4), f"the {preset} checkpoint")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if preset == "7b":
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from scripts.bench_convert import fake_checkpoint; "
                "fake_checkpoint(sys.argv[2], 32, 2 * 10 ** 9, int(sys.argv[3]))")
    else:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from ixc25_ms.testing import TinyModelTester; "
                "TinyModelTester(json.loads(sys.argv[4]), seed=int(sys.argv[3]), init='bench')"
                ".write_checkpoint(sys.argv[2], tokenizer=sys.argv[5])")
    print(f"[bench] building the {preset} checkpoint under {path} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-c", code, REPO, tmp, str(seed), json.dumps(cfg_dict), TOKENIZER], check=True)
    with open(os.path.join(tmp, DONE), "w") as f:
        f.write("ok\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path

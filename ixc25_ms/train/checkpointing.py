"""Writing what a fine-tuning run produces: official-layout checkpoints, PEFT adapters, checkpoint-N folders."""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional

import numpy as np

from ..weights.layout import load_state_dict
from ..weights.safetensors import write_safetensors
from ..weights.tags import f32_to_bf16
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA, adapter_config, adapter_state

SHARD_BYTES = 2 * 10 ** 9
# files of a model directory that travel with its weights: config, tokenizer, the official remote code and font
META_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|.*\.py|.*\.ttf)$")
CKPT = re.compile(r"^checkpoint-(\d+)$")


def _stored(arr: np.ndarray, dtype: str):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "bf16":
        return "BF16", f32_to_bf16(arr)
    if dtype == "fp16":
        return "F16", arr.astype(np.float16)
    return "F32", arr


def write_official(state: Dict[str, np.ndarray], src_dir: str, dst: str, dtype: str = "fp32",
                   shard_bytes: int = SHARD_BYTES) -> None:
    """An official-layout checkpoint in the existing directory `dst`: model.safetensors, or shards + index when
    larger than shard_bytes, plus the model files of `src_dir` that are not weights (config.json, tokenizer files,
    the official remote code), so both the official code and ixc25_ms.load read it. Files are written under .tmp names and
    renamed."""
    tensors = {k: _stored(v, dtype) for k, v in state.items()}
    shards: List[Dict] = [{}]
    size = 0
    for k, t in tensors.items():
        if size and size + t[1].nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t[1].nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        write_safetensors(os.path.join(dst, name), part, {"format": "pt"}, fsync=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(t[1].nbytes for t in tensors.values()))},
                 "weight_map": {k: n for n, part in zip(names, shards) for k in part}}
        write_json(os.path.join(dst, "model.safetensors.index.json"), index)
    for f in sorted(os.listdir(src_dir)):
        full = os.path.join(src_dir, f)
        if os.path.isfile(full) and META_FILE.match(f) and not os.path.exists(os.path.join(dst, f)):
            _atomic(os.path.join(dst, f), lambda p, full=full: shutil.copyfile(full, p))


def write_adapter(model, dst: str, base_path: str, llm_lora: Optional[dict], vit_lora: Optional[dict],
                  extra: Dict[str, np.ndarray]) -> None:
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors, PEFT key names), and the other tensors
    the run trained (output head, GN tokens, projector...) in non_lora_trainables.safetensors — the official
    script drops those silently."""
    state = adapter_state(model)
    write_safetensors(os.path.join(dst, ADAPTER_WEIGHTS), {k: _stored(v, "fp32") for k, v in state.items()},
                      {"format": "pt"}, fsync=True)
    write_json(os.path.join(dst, ADAPTER_CONFIG), adapter_config(base_path, llm_lora, vit_lora))
    if extra:
        write_safetensors(os.path.join(dst, NON_LORA), {k: _stored(v, "fp32") for k, v in extra.items()},
                          fsync=True)


def write_json(path: str, obj) -> None:
    def dump(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    _atomic(path, dump)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish_dir(build, dst: str) -> None:
    """build(tmp_dir) fills a fresh sibling directory, which then replaces `dst` by rename; on any error
    (a full disk included) the temporary directory is removed and an existing `dst` is untouched."""
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        build(tmp)
        if os.path.exists(dst):
            old = f"{tmp}.old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoints(output_dir: str) -> List[str]:
    """checkpoint-N folders of a run, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) for m in [CKPT.match(d)] if m]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def rotate(output_dir: str, limit: Optional[int]) -> None:
    """save_total_limit: delete the oldest checkpoint-N folders beyond the limit."""
    if not limit or limit < 1:
        return
    for d in checkpoints(output_dir)[:-limit]:
        shutil.rmtree(d, ignore_errors=True)


def read_optimizer(path: str) -> Dict[str, np.ndarray]:
    return load_state_dict(path)

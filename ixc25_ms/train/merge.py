"""`ixc25-merge`: fold a PEFT LoRA adapter into an official-layout checkpoint (the official merge_peft_adapter.py)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Tuple

import numpy as np

from ..weights import CheckpointError
from ..weights.layout import list_weight_files, load_state_dict
from ..weights.safetensors import SafetensorsFile, write_safetensors
from ..weights.tags import FLOAT_TAGS, bf16_to_f32, f32_to_bf16
from .checkpointing import META_FILE, publish_dir, write_json
from .lora import NON_LORA, AdapterError, merge_plan, merged_weight, read_adapter

TOOL = "ixc25-merge"


def _as_tag(arr32: np.ndarray, tag: str) -> Tuple[str, np.ndarray]:
    if tag == "BF16":
        return tag, f32_to_bf16(arr32)
    if tag == "F16":
        return tag, arr32.astype(np.float16)
    return "F32", arr32.astype(np.float32)


def merge(base: str, adapter: str, output: str, allow_pickle: bool = False, overwrite: bool = False) -> dict:
    """Writes `output`: every tensor of `base` with W + B·A·alpha/r folded into each adapted weight (in float32,
    stored back in the tensor's own dtype), the adapter's non-LoRA trained tensors replacing their originals,
    shard by shard (one shard in memory at a time), then base's config/tokenizer/code files. Atomic."""
    cfg, weights = read_adapter(adapter, allow_pickle)
    plan = merge_plan(cfg, weights, adapter)
    extra_path = os.path.join(adapter, NON_LORA)
    extra = load_state_dict(extra_path) if os.path.isfile(extra_path) else {}
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise CheckpointError(f"{output}: not empty (pass --overwrite)")
    files = list_weight_files(base, allow_pickle)[0]
    if any(f.endswith(".bin") for f in files):
        raise CheckpointError(f"{base}: merging reads safetensors checkpoints (convert .bin first with ixc25-convert)")
    done, seen = set(), set()

    def build(tmp: str):
        names = [os.path.basename(f) for f in files]
        weight_map = {}
        for fn, name in zip(files, names):
            st = SafetensorsFile(fn)
            out: Dict[str, Tuple[str, np.ndarray]] = {}
            for k in st.keys():
                seen.add(k)
                tag, raw = st.dtype_tag(k), st.read_raw(k)
                if k in plan or k in extra:
                    w = bf16_to_f32(raw) if tag == "BF16" else raw.astype(np.float32)
                    if k in extra:
                        w = extra[k].astype(np.float32)
                    if k in plan:
                        a, b, s = plan[k]
                        if w.shape != (b.shape[0], a.shape[1]):
                            raise AdapterError(f"{adapter}: {k}: B·A is {b.shape[0]}x{a.shape[1]}, the weight "
                                               f"{list(w.shape)}")
                        w = merged_weight(w, a, b, s)
                    out[k] = _as_tag(w, tag if tag in FLOAT_TAGS else "F32")
                    done.add(k)
                else:
                    out[k] = (tag, raw)
                weight_map[k] = name
            write_safetensors(os.path.join(tmp, name), out, {"format": "pt"})
        missing = sorted((set(plan) | set(extra)) - done)
        if missing:
            raise AdapterError(f"{adapter}: adapter tensor for {missing[0]!r} has no weight in {base}")
        if len(files) > 1:
            total = sum(os.path.getsize(os.path.join(tmp, n)) for n in names)
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        src = base if os.path.isdir(base) else os.path.dirname(base)
        for f in sorted(os.listdir(src)):
            if META_FILE.match(f) and os.path.isfile(os.path.join(src, f)):
                with open(os.path.join(src, f), "rb") as a, open(os.path.join(tmp, f), "wb") as b:
                    b.write(a.read())
    publish_dir(build, output)
    return {"merged": len(plan), "replaced": len(extra), "tensors": len(seen)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=TOOL, description="Merge a PEFT LoRA adapter into an official-layout IXC2.5 "
                                "checkpoint (W + B·A·alpha/r), as the official merge_peft_adapter.py.")
    p.add_argument("--base", "--base_model_name", dest="base", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", "--adapter_model_name", dest="adapter", required=True,
                   help="adapter directory (adapter_config.json + adapter_model.safetensors or .bin)")
    p.add_argument("--output", "--output_name", dest="output", required=True, help="output directory")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin with torch.load(weights_only)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    try:
        s = merge(args.base, args.adapter, args.output, args.allow_pickle, args.overwrite)
    except (CheckpointError, AdapterError, OSError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"{TOOL}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1
    print(f"{TOOL}: wrote {os.path.abspath(args.output)}: {s['merged']} weights merged, {s['replaced']} replaced, "
          f"{s['tensors']} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

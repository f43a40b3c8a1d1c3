"""Converters official <-> MindSpore: layouts, dtypes, bit-exact round trips, bad input, atomicity."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from converters import convert as conv
from converters import fastio, pipeline, shards, units
from converters.cli import main
from ixc25_ms.config import IXCConfig
from ixc25_ms.weights.keys import KEY_TABLE, UnknownKeyError, ms_to_official, official_to_ms
from ixc25_ms.weights.layout import is_converted_dir, iter_tensors, load_state_dict, open_weights
from ixc25_ms.weights.safetensors import SafetensorsFile, write_safetensors
from ixc25_ms.weights.spec import expected_parameters
from ixc25_ms.weights.tags import bf16_to_f32, f32_to_bf16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "official-tiny")

TINY = {
    "architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2", "bias": False,
    "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 40, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "max_position_embeddings": 64, "lora_r": 8, "web_lora_r": 16,
    "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 560, "patch_size": 14},
}
NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _special(tag):
    """Values whose bits must survive: signed zero, inf, NaN payloads, subnormals, extremes."""
    if tag == "F32":
        return np.array([0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFFFFFFF, 0x00000001, 0x7F7FFFFF],
                        dtype=np.uint32).view(np.float32)
    if tag == "F16":
        return np.array([0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFFFF, 0x0001, 0x7BFF], dtype=np.uint16).view(np.float16)
    return np.array([0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x0001, 0x7F7F], dtype=np.uint16)


def make_tensors(cfg_dict, tag="F32", seed=0, extra=None):
    cfg = IXCConfig.from_dict(cfg_dict)
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in expected_parameters(cfg).items():
        x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        if tag == "BF16":
            a = f32_to_bf16(x)
        else:
            a = x.astype(NP[tag])
        flat = a.reshape(-1)
        sp = _special(tag)
        flat[: min(len(sp), flat.size)] = sp[: flat.size]
        out[k] = (tag, a)
    for k, v in (extra or {}).items():
        out[k] = v
    return out


def write_ckpt(d, tensors, layout="single", cfg_dict=None, n_shards=3, files=True):
    """Official-layout checkpoint: single model.safetensors, sharded + index, or pytorch .bin (+ index)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict or TINY, f)
    if files:
        shutil.copyfile(os.path.join(GOLDEN, "tokenizer.model"), os.path.join(d, "tokenizer.model"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "InternLM2Tokenizer"}, f)
    keys = list(tensors)
    if layout == "single":
        write_safetensors(os.path.join(d, "model.safetensors"), tensors, {"format": "pt"})
        return
    parts = [keys[i::n_shards] for i in range(n_shards)]
    if layout == "sharded":
        wm = {}
        for i, part in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            write_safetensors(os.path.join(d, fn), {k: tensors[k] for k in part}, {"format": "pt"})
            wm.update({k: fn for k in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
        return
    import torch

    def tt(tag, a):
        if tag == "BF16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())
    if layout == "bin":
        torch.save({k: tt(*tensors[k]) for k in keys}, os.path.join(d, "pytorch_model.bin"))
        return
    wm = {}
    for i, part in enumerate(parts):
        fn = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({k: tt(*tensors[k]) for k in part}, os.path.join(d, fn))
        wm.update({k: fn for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


def raw_state(path, allow_pickle=False):
    src = open_weights(path, allow_pickle)
    return {k: (src.dtype_tag(k), src.read(k, None)) for k in src.keys()}


def run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def assert_clean_failure(rc, err, dst, *needles):
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if "ixc25-convert:" in ln]  # tqdm residue aside
    assert len(lines) == 1 and lines[0].startswith("ixc25-convert: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not os.path.exists(dst)
    parent = os.path.dirname(dst)
    if os.path.isdir(parent):
        assert not [e for e in os.listdir(parent) if ".ixc25-" in e], os.listdir(parent)


@pytest.fixture
def tiny(tmp_path):
    src = str(tmp_path / "src")
    tensors = make_tensors(TINY, "BF16")
    write_ckpt(src, tensors)
    return src, tensors


# --------------------------------------------------------------------------------------- spec and mapping
def test_param_spec_matches_golden():
    cfg = IXCConfig.from_file(GOLDEN)
    st = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    assert expected_parameters(cfg) == {k: st.shape(k) for k in st.keys()}


def test_param_spec_bias_and_ranks():
    base = expected_parameters(IXCConfig.from_dict(TINY))
    with_bias = expected_parameters(IXCConfig.from_dict(dict(TINY, bias=True)))
    added = set(with_bias) - set(base)
    assert added == {f"model.layers.{n}.attention.{w}.bias" for n in range(2) for w in ("wqkv", "wo")}
    assert with_bias["model.layers.0.attention.wqkv.bias"] == (64,)  # (4 + 2*2) * 8
    assert base["model.layers.1.feed_forward.w2.lora_web_A.weight"] == (16, 48)
    assert base["model.layers.1.feed_forward.w2.Plora_B.weight"] == (32, 8)


def test_mapping_table_both_ways():
    cfg = IXCConfig.from_dict(dict(TINY, bias=True))
    for k in expected_parameters(cfg):
        assert official_to_ms(k) == k
        assert ms_to_official(k) == k
    assert official_to_ms("model.layers.7.attention.rotary_emb.inv_freq") is None
    assert official_to_ms("vit.vision_tower.vision_model.embeddings.position_ids") is None
    for bad in ("model.layers.0.attention.wq.weight", "lm_head.weight", "model.layers.x.ffn_norm.weight"):
        with pytest.raises(UnknownKeyError):
            official_to_ms(bad)
    assert all(len(row) == 2 for row in KEY_TABLE)


def test_surgery_hook_round_trip(tmp_path, capsys, tiny, monkeypatch):
    from ixc25_ms.weights import keys as mapping
    src, tensors = tiny
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    monkeypatch.setattr(mapping, "SURGERY", {r"vision_proj\.2\.weight": (lambda a: a.T.copy(), lambda a: a.T.copy())})
    assert run(["--src", src, "--dst", ms_dir, "--quiet"], capsys)[0] == 0
    got = dict(iter_tensors(ms_dir, dtype=None))
    assert np.array_equal(got["vision_proj.2.weight"], tensors["vision_proj.2.weight"][1].T)
    assert run(["--src", ms_dir, "--dst", back, "--to-torch", "--quiet"], capsys)[0] == 0
    assert raw_state(back)["vision_proj.2.weight"][1].tobytes() == tensors["vision_proj.2.weight"][1].tobytes()


# --------------------------------------------------------------------------------------- golden checkpoint
def test_golden_converts_and_loads_back(tmp_path, capsys):
    import mindspore as ms
    dst = str(tmp_path / "ms")
    rc, err = run(["--src", GOLDEN, "--dst", dst, "--quiet"], capsys)
    assert rc == 0, err
    assert is_converted_dir(dst) and not is_converted_dir(GOLDEN)
    src = load_state_dict(GOLDEN)
    got = load_state_dict(dst)
    assert set(got) == set(src)
    for k in src:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], src[k]), k
    # the shard loads with mindspore.load_checkpoint too, bit for bit
    shard = os.path.join(dst, "ms_model-00001-of-00001.safetensors")
    params = ms.load_checkpoint(shard, format="safetensors")
    assert set(params) == set(src)
    assert all(np.array_equal(params[k].asnumpy(), src[k]) for k in src)
    for f in ("config.json", "tokenizer.model"):
        with open(os.path.join(GOLDEN, f), "rb") as a, open(os.path.join(dst, f), "rb") as b:
            assert a.read() == b.read()
    rec = json.load(open(os.path.join(dst, "conversion.json")))
    assert rec["num_converted"] == len(src) and rec["num_dropped"] == 0 and rec["tool_version"]
    for t in rec["tensors"]:
        assert hashlib.sha256(src[t["source_key"]].tobytes()).hexdigest() == t["sha256"]
    # iter_tensors restricted to some names
    sub = dict(iter_tensors(dst, names=["output.weight", "plora_sub_GN"]))
    assert set(sub) == {"output.weight", "plora_sub_GN"} and sub["plora_sub_GN"].shape == (1, 1, 1, 256)


# --------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tag", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_round_trip_bit_exact(tmp_path, capsys, tag, layout):
    src, ms_dir, back = (str(tmp_path / n) for n in ("src", "ms", "back"))
    tensors = make_tensors(TINY, tag, seed=1)
    write_ckpt(src, tensors, layout)
    rc, err = run(["--src", src, "--dst", ms_dir, "--shard-size", "20KB", "--quiet"], capsys)
    assert rc == 0, err
    index = json.load(open(os.path.join(ms_dir, "ms_model.index.json")))
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(tensors)
    raw = dict(iter_tensors(ms_dir, dtype=None))
    for k, (t, a) in tensors.items():
        assert raw[k].dtype == NP[t] and raw[k].tobytes() == a.tobytes(), k
    rc, err = run(["--src", ms_dir, "--dst", back, "--to-torch", "--quiet"], capsys)
    assert rc == 0, err
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(back, "tokenizer_config.json"))
    got = raw_state(back)
    assert set(got) == set(tensors)
    for k, (t, a) in tensors.items():
        assert got[k][0] == t and got[k][1].tobytes() == a.tobytes(), k
    with open(os.path.join(src, "config.json"), "rb") as a, open(os.path.join(back, "config.json"), "rb") as b:
        assert a.read() == b.read()


def test_to_torch_output_loads_with_torch(tmp_path, capsys, tiny):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    src, tensors = tiny
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    assert run(["--src", src, "--dst", ms_dir, "--quiet"], capsys)[0] == 0
    assert run(["--src", ms_dir, "--dst", back, "--to-torch", "--quiet", "--shard-size", "30KB"], capsys)[0] == 0
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    sd = {}
    for fn in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(back, fn), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        sd.update(load_file(os.path.join(back, fn)))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for k, (_, a) in tensors.items():
        assert sd[k].dtype == torch.bfloat16
        assert np.array_equal(sd[k].view(torch.int16).numpy().view(np.uint16), a), k


def test_ckpt_format_round_trip(tmp_path, capsys, tiny):
    import mindspore as ms
    src, tensors = tiny
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    rc, err = run(["--src", src, "--dst", ms_dir, "--format", "ckpt", "--shard-size", "30KB", "--quiet"], capsys)
    assert rc == 0, err
    files = sorted(f for f in os.listdir(ms_dir) if f.endswith(".ckpt"))
    assert len(files) > 1
    loaded = {}
    for f in files:
        loaded.update(ms.load_checkpoint(os.path.join(ms_dir, f)))
    assert set(loaded) == set(tensors)
    assert all(loaded[k].dtype == ms.bfloat16 for k in loaded)
    got = load_state_dict(ms_dir)
    for k, (_, a) in tensors.items():
        assert np.array_equal(got[k], bf16_to_f32(a), equal_nan=True), k
    assert run(["--src", ms_dir, "--dst", back, "--to-torch", "--quiet"], capsys)[0] == 0
    back_raw = raw_state(back)
    for k, (t, a) in tensors.items():
        assert back_raw[k][0] == t and back_raw[k][1].tobytes() == a.tobytes(), k


@pytest.mark.parametrize("layout", ["bin", "bin_sharded"])
def test_pickle_needs_flag(tmp_path, capsys, layout):
    src, dst, back = str(tmp_path / "src"), str(tmp_path / "ms"), str(tmp_path / "back")
    tensors = make_tensors(TINY, "BF16", seed=2)
    write_ckpt(src, tensors, layout)
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, "--allow-pickle", "pytorch_model")
    rc, err = run(["--src", src, "--dst", dst, "--allow-pickle", "--quiet"], capsys)
    assert rc == 0, err
    assert run(["--src", dst, "--dst", back, "--to-torch", "--quiet"], capsys)[0] == 0
    got = raw_state(back)
    for k, (t, a) in tensors.items():
        assert got[k][0] == t and got[k][1].tobytes() == a.tobytes(), k


def test_corrupt_pickle(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "ms")
    write_ckpt(src, make_tensors(TINY, "F32"), "bin")
    p = os.path.join(src, "pytorch_model.bin")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    rc, err = run(["--src", src, "--dst", dst, "--allow-pickle"], capsys)
    assert_clean_failure(rc, err, dst, "pytorch_model.bin")


@pytest.mark.parametrize("src_tag,dst_name,dst_tag", [("F32", "bf16", "BF16"), ("BF16", "fp32", "F32"),
                                                       ("F16", "bf16", "BF16"), ("BF16", "fp16", "F16")])
def test_dtype_cast(tmp_path, capsys, src_tag, dst_name, dst_tag):
    import torch
    src, dst = str(tmp_path / "src"), str(tmp_path / "ms")
    tensors = make_tensors(TINY, src_tag, seed=3)
    tag0, a0 = tensors["output.weight"]
    big = a0.copy()
    if src_tag == "BF16":
        big.reshape(-1)[-1] = f32_to_bf16(np.array([1e30], np.float32))[0]  # beyond fp16
    tensors["output.weight"] = (tag0, big)
    write_ckpt(src, tensors)
    rc, err = run(["--src", src, "--dst", dst, "--dtype", dst_name], capsys)
    assert rc == 0, err
    raw = dict(iter_tensors(dst, dtype=None))
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k, (t, a) in tensors.items():
        x = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16) if t == "BF16" else torch.from_numpy(a)
        y = x.to(tdt[dst_tag])
        ref = y.view(torch.int16).numpy().view(np.uint16) if dst_tag == "BF16" else y.numpy()
        assert raw[k].dtype == ref.dtype
        same = raw[k].view(np.uint8) == ref.view(np.uint8)
        nan = np.isnan(bf16_to_f32(ref) if dst_tag == "BF16" else ref)
        assert np.all(same.reshape(ref.shape + (-1,)).all(-1) | nan), k  # NaN payloads may differ
    rec = json.load(open(os.path.join(dst, "conversion.json")))
    assert rec["output_dtypes"] == [dst_tag]
    if dst_tag == "F16" and src_tag == "BF16":
        assert any("output.weight" in w and "inf" in w for w in rec["warnings"])
        assert "warning" in err


# --------------------------------------------------------------------------------------- behaviour
def test_dropped_buffers_are_recorded(tmp_path, capsys):
    src, dst, back = str(tmp_path / "src"), str(tmp_path / "ms"), str(tmp_path / "back")
    extra = {"model.layers.0.attention.rotary_emb.inv_freq": ("F32", np.arange(4, dtype=np.float32)),
             "vit.vision_tower.vision_model.embeddings.position_ids": ("I64", np.arange(1601, dtype=np.int64)[None])}
    tensors = make_tensors(TINY, "F16", extra=extra)
    write_ckpt(src, tensors, "sharded")
    assert run(["--src", src, "--dst", dst, "--quiet"], capsys)[0] == 0
    rec = json.load(open(os.path.join(dst, "conversion.json")))
    by_src = {t["source_key"]: t for t in rec["tensors"]}
    assert set(by_src) == set(tensors)
    for k in extra:
        assert by_src[k]["target"] == "dropped"
        assert by_src[k]["sha256"] == hashlib.sha256(extra[k][1].tobytes()).hexdigest()
    assert rec["num_dropped"] == 2
    assert set(load_state_dict(dst)) == set(tensors) - set(extra)
    assert run(["--src", dst, "--dst", back, "--to-torch", "--quiet"], capsys)[0] == 0
    assert set(raw_state(back)) == set(tensors) - set(extra)


def test_shards_respect_size(tmp_path, capsys, tiny):
    src, tensors = tiny
    dst = str(tmp_path / "ms")
    assert run(["--src", src, "--dst", dst, "--shard-size", "10KB", "--quiet"], capsys)[0] == 0
    index = json.load(open(os.path.join(dst, "ms_model.index.json")))
    sizes = {}
    for k, fn in index["weight_map"].items():
        sizes.setdefault(fn, []).append(tensors[k][1].nbytes)
    for fn, s in sizes.items():
        assert sum(s) <= 10_000 or len(s) == 1, (fn, s)
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors.values())


def test_idempotence(tmp_path, capsys, tiny):
    src, _ = tiny
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    assert run(["--src", src, "--dst", a, "--quiet"], capsys)[0] == 0
    rc, err = run(["--src", a, "--dst", c], capsys)
    assert_clean_failure(rc, err, c, "conversion.json", "--to-torch")
    rc, err = run(["--src", src, "--dst", c, "--to-torch"], capsys)
    assert_clean_failure(rc, err, c, "conversion.json")
    assert run(["--src", src, "--dst", b, "--quiet"], capsys)[0] == 0
    shard = "ms_model-00001-of-00001.safetensors"
    assert open(os.path.join(a, shard), "rb").read() == open(os.path.join(b, shard), "rb").read()
    # same conversion again over an existing output: refused, then replaced with --overwrite
    rc, err = run(["--src", src, "--dst", a], capsys)
    assert rc == 1 and "--overwrite" in err and is_converted_dir(a)
    assert run(["--src", src, "--dst", a, "--overwrite", "--quiet"], capsys)[0] == 0
    assert open(os.path.join(a, shard), "rb").read() == open(os.path.join(b, shard), "rb").read()


def test_quiet_and_progress(tmp_path, capsys, tiny):
    src, _ = tiny
    rc = main(["--src", src, "--dst", str(tmp_path / "q"), "--quiet"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == "" and out.err == ""
    rc = main(["--src", src, "--dst", str(tmp_path / "p")])
    out = capsys.readouterr()
    assert rc == 0 and "convert" in out.err and "wrote" in out.out


def test_dst_inside_src_refused(tmp_path, capsys, tiny):
    src, _ = tiny
    dst = os.path.join(src, "out")
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, "source")


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--src", "a", "--dst", "b", "--shard-size", "lots"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--src", "a", "--dst", "b", "--to-torch", "--format", "ckpt"])
    assert e.value.code == 2
    assert units.parse_size("2GB") == 2 * 10 ** 9 and units.parse_size("1GiB") == 1 << 30
    assert units.parse_size("512") == 512


# --------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, capsys, mutate, *needles, layout="single", allow_pickle=False):
    src, dst = str(tmp_path / "src"), str(tmp_path / "out" / "ms")
    tensors = make_tensors(TINY, "F32", seed=4)
    mutate_before = mutate(tensors)
    write_ckpt(src, tensors if mutate_before is None else mutate_before, layout)
    post = getattr(mutate, "post", None)
    if post:
        post(src)
    args = ["--src", src, "--dst", dst] + (["--allow-pickle"] if allow_pickle else [])
    rc, err = run(args, capsys)
    assert_clean_failure(rc, err, dst, *needles)
    return err


def test_bad_corrupt_header(tmp_path, capsys):
    def m(t):
        return None
    m.post = lambda src: open(os.path.join(src, "model.safetensors"), "r+b").write(struct.pack("<Q", 40) + b"{not json")
    _bad(tmp_path, capsys, m, "model.safetensors", "corrupt safetensors header")


def test_bad_truncated_shard(tmp_path, capsys):
    def m(t):
        return None

    def post(src):
        p = os.path.join(src, "model-00002-of-00003.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)
    m.post = post
    _bad(tmp_path, capsys, m, "model-00002-of-00003.safetensors", "truncated", "key '", layout="sharded")


def test_bad_index_missing_file(tmp_path, capsys):
    def m(t):
        return None
    m.post = lambda src: os.remove(os.path.join(src, "model-00003-of-00003.safetensors"))
    _bad(tmp_path, capsys, m, "model.safetensors.index.json", "model-00003-of-00003.safetensors", "key '",
         layout="sharded")


def test_bad_index_disagrees(tmp_path, capsys):
    def m(t):
        return None

    def post(src):
        p = os.path.join(src, "model.safetensors.index.json")
        d = json.load(open(p))
        d["weight_map"]["output.weight"] = "model-00001-of-00003.safetensors" \
            if d["weight_map"]["output.weight"] != "model-00001-of-00003.safetensors" \
            else "model-00002-of-00003.safetensors"
        json.dump(d, open(p, "w"))
    m.post = post
    _bad(tmp_path, capsys, m, "model.safetensors.index.json", "'output.weight'", layout="sharded")


def test_bad_wrong_shape(tmp_path, capsys):
    def m(t):
        t["model.layers.1.feed_forward.w2.weight"] = ("F32", np.zeros((32, 47), np.float32))
    _bad(tmp_path, capsys, m, "model.safetensors", "'model.layers.1.feed_forward.w2.weight'", "[32, 47]",
         "[32, 48]", "config.json")


def test_bad_unknown_key(tmp_path, capsys):
    def m(t):
        t["model.layers.0.attention.q_proj.weight"] = ("F32", np.zeros((4, 4), np.float32))
    _bad(tmp_path, capsys, m, "model.safetensors", "unknown key 'model.layers.0.attention.q_proj.weight'")


def test_bad_key_beyond_config(tmp_path, capsys):
    def m(t):
        t["model.layers.2.ffn_norm.weight"] = ("F32", np.zeros((32,), np.float32))
    _bad(tmp_path, capsys, m, "model.safetensors", "'model.layers.2.ffn_norm.weight'", "not a parameter")


@pytest.mark.parametrize("tag,np_dtype", [("I32", np.int32), ("F64", np.float64)])
def test_bad_unsupported_dtype(tmp_path, capsys, tag, np_dtype):
    def m(t):
        t["model.norm.weight"] = (tag, np.ones((32,), np_dtype))
    _bad(tmp_path, capsys, m, "model.safetensors", "'model.norm.weight'", f"unsupported dtype {tag}")


def test_bad_unknown_dtype_tag(tmp_path, capsys):
    def m(t):
        return None

    def post(src):
        p = os.path.join(src, "model.safetensors")
        data = open(p, "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        head = json.loads(data[8:8 + n])
        head["model.norm.weight"]["dtype"] = "F8_E4M3"
        hb = json.dumps(head).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    m.post = post
    _bad(tmp_path, capsys, m, "model.safetensors", "'model.norm.weight'", "unsupported dtype F8_E4M3")


def test_bad_missing_parameter(tmp_path, capsys):
    def m(t):
        del t["plora_glb_GN"]
    _bad(tmp_path, capsys, m, "missing", "'plora_glb_GN'")


def test_bad_not_a_checkpoint(tmp_path, capsys):
    src, dst = tmp_path / "notes", str(tmp_path / "ms")
    src.mkdir()
    (src / "README.md").write_text("hello")
    rc, err = run(["--src", str(src), "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, str(src), "not a checkpoint directory")
    rc, err = run(["--src", str(tmp_path / "nowhere"), "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, "nowhere", "no such file or directory")


def test_bad_missing_config(tmp_path, capsys):
    def m(t):
        return None
    m.post = lambda src: os.remove(os.path.join(src, "config.json"))
    _bad(tmp_path, capsys, m, "no config.json")


def test_bad_no_space(tmp_path, capsys, tiny, monkeypatch):
    src, _ = tiny
    dst = str(tmp_path / "ms")
    real = shutil.disk_usage

    def tiny_disk(path):
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)
    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, "not enough free disk space", "need", "1.0 KB free")


def test_bad_non_empty_dst(tmp_path, capsys, tiny):
    src, _ = tiny
    dst = tmp_path / "ms"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = run(["--src", src, "--dst", str(dst)], capsys)
    assert rc == 1 and "not empty" in err and "--overwrite" in err
    assert os.listdir(dst) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["--src", src, "--dst", str(empty), "--quiet"], capsys)[0] == 0  # an empty dst is fine


def test_to_torch_detects_corrupted_shard(tmp_path, capsys, tiny):
    src, _ = tiny
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    assert run(["--src", src, "--dst", ms_dir, "--quiet"], capsys)[0] == 0
    shard = os.path.join(ms_dir, "ms_model-00001-of-00001.safetensors")
    os.chmod(shard, 0o644)
    with open(shard, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    rc, err = run(["--src", ms_dir, "--dst", back, "--to-torch"], capsys)
    assert_clean_failure(rc, err, back, "sha256", "key '")


# --------------------------------------------------------------------------------------- atomicity
def test_failure_midway_leaves_nothing(tmp_path, capsys, tiny, monkeypatch):
    src, _ = tiny
    dst = str(tmp_path / "ms")
    real = shards.save_ms_shard
    calls = []

    def flaky(tensors, path, fmt):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        real(tensors, path, fmt)
    monkeypatch.setattr(shards, "save_ms_shard", flaky)
    rc, err = run(["--src", src, "--dst", dst, "--shard-size", "20KB"], capsys)
    assert len(calls) == 2
    assert_clean_failure(rc, err, dst, "No space left on device")
    # with --overwrite, a failed conversion keeps the old output untouched
    monkeypatch.setattr(shards, "save_ms_shard", real)
    assert run(["--src", src, "--dst", dst, "--quiet"], capsys)[0] == 0
    before = sorted(os.listdir(dst))
    calls.clear()
    monkeypatch.setattr(shards, "save_ms_shard", flaky)
    rc, err = run(["--src", src, "--dst", dst, "--shard-size", "20KB", "--overwrite"], capsys)
    assert rc == 1 and sorted(os.listdir(dst)) == before and is_converted_dir(dst)
    assert not [e for e in os.listdir(tmp_path) if ".ixc25-" in e]


def test_killed_conversion_leaves_nothing_complete(tmp_path, tiny):
    src, _ = tiny
    dst = str(tmp_path / "ms")
    script = (
        "import os, signal, sys\n"
        "import converters.shards as c\n"
        "real = c.save_ms_shard\n"
        "n = [0]\n"
        "def die(t, p, f):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(t, p, f)\n"
        "c.save_ms_shard = die\n"
        "from converters.cli import main\n"
        f"sys.exit(main(['--src', {src!r}, '--dst', {dst!r}, '--shard-size', '20KB', '--quiet']))\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    assert not os.path.exists(dst)
    partial = [e for e in os.listdir(tmp_path) if e.startswith(".ms.ixc25-partial-")]
    assert len(partial) == 1
    assert not os.path.exists(os.path.join(tmp_path, partial[0], "conversion.json"))
    assert main(["--src", src, "--dst", dst, "--quiet"]) == 0  # a rerun clears the stale partial
    assert is_converted_dir(dst)
    assert not [e for e in os.listdir(tmp_path) if ".ixc25-" in e]


# --------------------------------------------------------------------------------------- the shard writer
def _mixed_tensors(seed=3):
    """The tiny model with F32, BF16 and F16 tensors side by side (writer order sorts by dtype)."""
    by_tag = {t: make_tensors(TINY, t, seed=seed) for t in ("F32", "BF16", "F16")}
    return {k: by_tag[("F32", "BF16", "F16")[i % 3]][k] for i, k in enumerate(by_tag["F32"])}


@pytest.mark.parametrize("kernel,direct,chunk,threads", [
    (False, True, None, None), (False, True, 4096, 2), (False, False, 4096, 1), (False, True, 24576, 1),
    (True, None, None, None), (True, None, 4096, 2), (True, None, 1000, 1)])
def test_writer_byte_identical_to_mindspore(tmp_path, capsys, monkeypatch, kernel, direct, chunk, threads):
    """Our safetensors shards equal, byte for byte, what mindspore.save_checkpoint writes for the same
    tensors, load back bit-exact with mindspore.load_checkpoint, and carry the sha256 of the written bytes;
    through the kernel copy (copy_file_range, any chunk size, 1 or 2 hash threads) and through the buffer
    pipeline, whatever its buffer size (tensors spanning buffers, buffers holding many tensors), hash threads,
    and with O_DIRECT or buffered writes."""
    import mindspore as ms
    from ixc25_ms.weights.sources import ms_numpy_dtype
    monkeypatch.setattr(pipeline, "USE_KERNEL_COPY", kernel)
    calls = _count_copy_file_range(monkeypatch)
    if kernel:
        if chunk:
            monkeypatch.setattr(fastio, "COPY_CHUNK", chunk)
        if threads:
            monkeypatch.setattr(fastio, "COPY_HASH_THREADS", threads)
    else:
        monkeypatch.setattr(pipeline, "USE_DIRECT", direct)
        if chunk:
            monkeypatch.setattr(pipeline, "DIRECT_CHUNK", chunk)
            monkeypatch.setattr(pipeline, "DIRECT_BUFFERS", 3)
        if threads:
            monkeypatch.setattr(pipeline, "HASH_THREADS", threads)
    src, dst = str(tmp_path / "src"), str(tmp_path / "ms")
    tensors = _mixed_tensors()
    write_ckpt(src, tensors, "sharded")
    rc, err = run(["--src", src, "--dst", dst, "--shard-size", "30KB", "--quiet"], capsys)
    assert rc == 0, err
    index = json.load(open(os.path.join(dst, "ms_model.index.json")))["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 1
    for fn in files:
        names = [k for k in tensors if index[k] == fn]
        ref = str(tmp_path / f"ref-{fn}")
        ms.save_checkpoint([{"name": k, "data": ms.Tensor.from_numpy(
            np.ascontiguousarray(tensors[k][1]).view(ms_numpy_dtype(tensors[k][0])))} for k in names],
            ref, format="safetensors")
        with open(ref, "rb") as a, open(os.path.join(dst, fn), "rb") as b:
            assert a.read() == b.read(), fn
        params = ms.load_checkpoint(os.path.join(dst, fn), format="safetensors")
        assert set(params) == set(names)
        for k in names:
            got = params[k].asnumpy()
            assert got.tobytes() == tensors[k][1].tobytes() and got.shape == tensors[k][1].shape, k
    rec = json.load(open(os.path.join(dst, "conversion.json")))
    for t in rec["tensors"]:
        assert t["sha256"] == hashlib.sha256(tensors[t["source_key"]][1].tobytes()).hexdigest(), t["source_key"]
    raw = dict(iter_tensors(dst, dtype=None))
    assert all(raw[k].tobytes() == a.tobytes() for k, (_, a) in tensors.items())
    assert (calls[0] > 0) == kernel  # the default conversion copies in the kernel; the switch turns it off


def _count_copy_file_range(monkeypatch, fail=None):
    """Wrap os.copy_file_range: count the calls; `fail(n)` may return an OSError to raise on call n."""
    real, calls = os.copy_file_range, [0]

    def wrapped(*a):
        calls[0] += 1
        err = fail(calls[0]) if fail else None
        if err is not None:
            raise err
        return real(*a)
    monkeypatch.setattr(os, "copy_file_range", wrapped)
    return calls


@pytest.mark.parametrize("how", ["refused", "copies-nothing"])
def test_kernel_copy_fallbacks(tmp_path, capsys, monkeypatch, how):
    """Where the kernel refuses copy_file_range (EXDEV: another filesystem) the shard streams through the
    buffers; where it returns 0 with bytes left (some filesystems), the rest goes through user space. Same
    bytes and sha256 either way."""
    import errno as _errno
    src, dst = str(tmp_path / "src"), str(tmp_path / "ms")
    tensors = _mixed_tensors()
    write_ckpt(src, tensors, "sharded")
    monkeypatch.setattr(fastio, "COPY_CHUNK", 4096)
    if how == "refused":
        calls = _count_copy_file_range(monkeypatch, lambda n: OSError(_errno.EXDEV, "Invalid cross-device link"))
    else:
        calls = [0]

        def nothing(*a):
            calls[0] += 1
            return 0
        monkeypatch.setattr(os, "copy_file_range", nothing)
    rc, err = run(["--src", src, "--dst", dst, "--shard-size", "30KB", "--quiet"], capsys)
    assert rc == 0, err
    assert calls[0] > 0
    raw = dict(iter_tensors(dst, dtype=None))
    assert all(raw[k].tobytes() == a.tobytes() for k, (_, a) in tensors.items())
    for t in json.load(open(os.path.join(dst, "conversion.json")))["tensors"]:
        assert t["sha256"] == hashlib.sha256(tensors[t["source_key"]][1].tobytes()).hexdigest(), t["source_key"]


def test_kernel_copy_error(tmp_path, capsys, tiny, monkeypatch):
    """A failing kernel copy (disk full) after the first chunk: the error, no hang, nothing left."""
    src, _ = tiny
    dst = str(tmp_path / "ms")
    monkeypatch.setattr(fastio, "COPY_CHUNK", 4096)
    calls = _count_copy_file_range(monkeypatch, lambda n: OSError(28, "No space left on device") if n == 3 else None)
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert calls[0] == 3
    assert_clean_failure(rc, err, dst, "No space left on device")


def test_safetensors_conversion_does_not_import_mindspore(tmp_path, tiny):
    src, _ = tiny
    dst = str(tmp_path / "ms")
    script = ("import sys\nfrom converters.cli import main\n"
              f"rc = main(['--src', {src!r}, '--dst', {dst!r}, '--quiet'])\n"
              "print(rc, 'mindspore' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.stdout.split() == ["0", "False"], p.stdout + p.stderr
    from importlib.metadata import version
    assert json.load(open(os.path.join(dst, "conversion.json")))["mindspore_version"] == version("mindspore")


@pytest.mark.parametrize("kernel", [True, False])
def test_source_truncated_after_planning(tmp_path, capsys, tiny, monkeypatch, kernel):
    """The headers said N bytes, the file shrank before the bytes were read: a clean one-line failure."""
    src, _ = tiny
    dst = str(tmp_path / "ms")
    monkeypatch.setattr(pipeline, "USE_KERNEL_COPY", kernel)
    real = conv.plan_to_ms

    def plan_then_truncate(*a, **k):
        plan = real(*a, **k)
        f = os.path.join(src, "model.safetensors")
        os.truncate(f, os.path.getsize(f) - 100)
        return plan
    monkeypatch.setattr(conv, "plan_to_ms", plan_then_truncate)
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert_clean_failure(rc, err, dst, "truncated file", "model.safetensors")


@pytest.mark.parametrize("direct", [True, False])
def test_write_error_in_pipeline(tmp_path, capsys, tiny, monkeypatch, direct):
    """A failing write on a writer thread (disk full) surfaces as the error, with no hang and nothing left."""
    src, _ = tiny
    dst = str(tmp_path / "ms")
    monkeypatch.setattr(pipeline, "USE_KERNEL_COPY", False)
    monkeypatch.setattr(pipeline, "USE_DIRECT", direct)
    monkeypatch.setattr(pipeline, "DIRECT_CHUNK", 8192)
    monkeypatch.setattr(pipeline, "DIRECT_BUFFERS", 2)
    real, n = os.pwrite, [0]

    def pwrite(fd, data, off):
        n[0] += 1
        if n[0] == 3:
            raise OSError(28, "No space left on device")
        return real(fd, data, off)
    monkeypatch.setattr(os, "pwrite", pwrite)
    rc, err = run(["--src", src, "--dst", dst], capsys)
    assert n[0] >= 3
    assert_clean_failure(rc, err, dst, "No space left on device")

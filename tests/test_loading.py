"""ixc25_ms.load over every layout: official single/sharded/bf16/.bin, our converted dirs; streaming, no full copy."""
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.weights.safetensors import SafetensorsFile, write_safetensors
from ixc25_ms.weights.tags import f32_to_bf16
from parity_tests.helpers import GOLDEN
from parity_tests.tolerance import assert_close

META = ("config.json", "tokenizer.model")


@pytest.fixture(scope="module")
def golden_logits():
    exp = dict(np.load(os.path.join(GOLDEN, "expected.npz")))
    return exp


def _logits(d, exp, dtype="float32"):
    model, _ = ixc25_ms.load(str(d), dtype=dtype)
    return model(inputs_embeds=ms.Tensor(exp["inputs_embeds"][:, :300]), im_mask=exp["im_mask"][:, :300]).logits


def _copy_meta(dst):
    os.makedirs(dst, exist_ok=True)
    for f in META:
        shutil.copy(os.path.join(GOLDEN, f), dst)


def _write_sharded(dst, bf16: bool, n_shards: int = 3):
    st = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    keys = st.keys()
    wm = {}
    for i in range(n_shards):
        part = keys[i::n_shards]
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {k: ("BF16", f32_to_bf16(st.read(k))) if bf16 else ("F32", st.read(k)) for k in part}
        write_safetensors(os.path.join(dst, name), tensors, {"format": "pt"})
        wm.update({k: name for k in part})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))


def test_sharded_fp32_equals_single_file(tmp_path, golden_logits):
    d = tmp_path / "sharded"
    _copy_meta(d)
    _write_sharded(str(d), bf16=False)
    ref = golden_logits["logits"][:, :300]
    assert_close(_logits(d, golden_logits), ref, "fp32", "sharded fp32 checkpoint logits")


def test_bf16_sharded_loads_as_fp32_and_fp16(tmp_path, golden_logits):
    d = tmp_path / "bf16"
    _copy_meta(d)
    _write_sharded(str(d), bf16=True)
    model, _ = ixc25_ms.load(str(d))
    w = model.model.layers[1].feed_forward.w2.weight.asnumpy()
    src = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors")).read("model.layers.1.feed_forward.w2.weight")
    np.testing.assert_array_equal(w, (f32_to_bf16(src).astype(np.uint32) << 16).view(np.float32))
    assert_close(_logits(d, golden_logits), golden_logits["logits"][:, :300], "bf16", "bf16 checkpoint, fp32 compute")
    assert_close(_logits(d, golden_logits, "float16"), golden_logits["logits"][:, :300], "bf16",
                 "bf16 checkpoint, fp16 compute")


def test_pickle_bin_with_flag(tmp_path, golden_logits):
    import torch
    d = tmp_path / "bin"
    _copy_meta(d)
    st = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    torch.save({k: torch.from_numpy(st.read(k).copy()) for k in st.keys()}, str(d / "pytorch_model.bin"))
    with pytest.raises(ixc25_ms.CheckpointError, match="allow_pickle"):
        ixc25_ms.load(str(d))
    model, _ = ixc25_ms.load(str(d), allow_pickle=True)
    out = model(inputs_embeds=ms.Tensor(golden_logits["inputs_embeds"][:, :300]),
                im_mask=golden_logits["im_mask"][:, :300]).logits
    assert_close(out, golden_logits["logits"][:, :300], "fp32", ".bin checkpoint logits")


def test_converted_dir_logits_equal_source(tmp_path, golden_logits):
    from converters.cli import main as convert
    dst = tmp_path / "ms"
    assert convert(["--src", GOLDEN, "--dst", str(dst), "--quiet"]) == 0
    a = _logits(GOLDEN, golden_logits).asnumpy()
    b = _logits(dst, golden_logits).asnumpy()
    np.testing.assert_array_equal(a, b)


def test_converted_ckpt_dir_loads_bit_exact(tmp_path):
    """.ckpt shards (shapes from conversion.json: read, then checked, then assigned) fill every parameter."""
    from converters.cli import main as convert
    dst = tmp_path / "ckpt"
    assert convert(["--src", GOLDEN, "--dst", str(dst), "--format", "ckpt", "--shard-size", "2MB", "--quiet"]) == 0
    assert len([f for f in os.listdir(dst) if f.endswith(".ckpt")]) > 1
    a, _ = ixc25_ms.load(GOLDEN)
    b, _ = ixc25_ms.load(str(dst))
    pb = dict(b.parameters_and_names())
    for k, p in a.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), pb[k].asnumpy(), err_msg=k)


def test_streaming_never_builds_a_full_state_dict(tmp_path, monkeypatch, golden_logits):
    import ixc25_ms.weights.layout as layout

    def boom(*a, **k):
        raise AssertionError("load() must stream, not read a whole state dict")
    monkeypatch.setattr(layout, "load_state_dict", boom)
    monkeypatch.setattr(layout, "iter_tensors", boom)
    d = tmp_path / "sharded"
    _copy_meta(d)
    _write_sharded(str(d), bf16=False)
    ixc25_ms.load(str(d))


def test_errors_leave_model_unassigned_and_name_the_key(tmp_path):
    d = tmp_path / "bad"
    _copy_meta(d)
    _write_sharded(str(d), bf16=False)
    idx = json.load(open(d / "model.safetensors.index.json"))
    idx["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    json.dump(idx, open(d / "model.safetensors.index.json", "w"))
    with pytest.raises(ixc25_ms.CheckpointError, match="missing file 'model-00009-of-00009.safetensors'"):
        ixc25_ms.load(str(d))


def test_bf16_is_refused_on_cpu_and_builds_where_supported(monkeypatch):
    """One dtype table: bf16 needs a device target with bf16 kernels; on CPU a one-line error says what to use."""
    from ixc25_ms import dtypes
    with pytest.raises(dtypes.DtypeError) as e:
        ixc25_ms.load(GOLDEN, dtype="bfloat16")
    msg = str(e.value)
    assert "\n" not in msg and "float32" in msg and "float16" in msg and "CPU" in msg
    # where the target has bf16 kernels (Ascend) the model is built and loaded in bf16, ViT and LLM alike
    monkeypatch.setattr(dtypes, "BF16_TARGETS", ("Ascend", ms.get_context("device_target")))
    model, _ = ixc25_ms.load(GOLDEN, dtype="bf16")
    dts = {p.dtype for _, p in model.parameters_and_names()}
    assert dts == {ms.bfloat16}
    w = model.vit.vision_tower.vision_model.embeddings.patch_embedding.weight
    src = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors")).read(
        "vit.vision_tower.vision_model.embeddings.patch_embedding.weight")
    np.testing.assert_allclose(w.astype(ms.float32).asnumpy(), src, rtol=2 ** -8)

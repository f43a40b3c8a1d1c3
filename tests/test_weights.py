"""ixc25_ms.weights: one dispatch per layout, one source interface, pickle dtypes named, raw reads, bf16 pair, drops."""
import json
import os

import numpy as np
import pytest

from converters.cli import main as convert
from ixc25_ms.weights import CheckpointError
from ixc25_ms.weights.keys import KEY_TABLE, is_droppable
from ixc25_ms.weights.layout import iter_tensors, open_weights
from ixc25_ms.weights.safetensors import SafetensorsFile, header_bytes, write_safetensors
from ixc25_ms.weights.sources import MsCkptSource, PickleSource, SafetensorsSource
from ixc25_ms.weights.tags import bf16_to_f32, cast_raw, f32_to_bf16, widen
from tests.test_converters import TINY, make_tensors, write_ckpt

# layout written by write_ckpt / convert -> (source type, format, layout, number of files)
LAYOUTS = {
    "single": (SafetensorsSource, "safetensors", "official", 1),
    "sharded": (SafetensorsSource, "safetensors", "official", 3),
    "bin": (PickleSource, "pickle", "official", 1),
    "bin_sharded": (PickleSource, "pickle", "official", 3),
    "converted-safetensors": (SafetensorsSource, "safetensors", "converted", None),  # None: as its index says
    "converted-ckpt": (MsCkptSource, "ckpt", "converted", None),
}


@pytest.fixture(scope="module")
def tensors():
    return make_tensors(TINY, "BF16", seed=7)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tensors):
    """Every layout of the same bf16 tensors, written once for the module."""
    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for name in ("single", "sharded", "bin", "bin_sharded"):
        dirs[name] = str(root / name)
        write_ckpt(dirs[name], tensors, name, files=False)
    for fmt in ("safetensors", "ckpt"):
        dirs[f"converted-{fmt}"] = d = str(root / f"converted-{fmt}")
        assert convert(["--src", dirs["single"], "--dst", d, "--format", fmt, "--shard-size", "60KB",
                        "--quiet"]) == 0
    return dirs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_open_weights_picks_each_layout(layouts, tensors, layout):
    """The one dispatch gives the right source for every layout; the same interface reads the same bits."""
    cls, fmt, kind, n_files = LAYOUTS[layout]
    src = open_weights(layouts[layout], allow_pickle=True)
    assert type(src) is cls and src.format == fmt and src.layout == kind
    if n_files is None:
        wm = json.load(open(os.path.join(layouts[layout], "ms_model.index.json")))["weight_map"]
        n_files = len(set(wm.values()))
        assert n_files > 1
    assert len(src.files) == n_files
    assert sorted(src.keys()) == sorted(tensors)
    for k, (tag, a) in tensors.items():
        assert src.dtype_tag(k) == tag and src.shape(k) == a.shape, k
        raw = src.read(k, None)
        assert raw.dtype == np.uint16 and raw.tobytes() == a.tobytes(), k
        wide = src.read(k)  # float32, widened exactly
        assert wide.dtype == np.float32 and wide.tobytes() == bf16_to_f32(a).tobytes(), k
    span = src.span("output.weight")
    assert (span is not None) == (fmt == "safetensors")
    if span is not None:
        with open(span.path, "rb") as f:
            f.seek(span.offset)
            assert f.read(span.nbytes) == tensors["output.weight"][1].tobytes()
    src.close()


def test_single_file_path_and_pickle_flag(layouts):
    st = open_weights(os.path.join(layouts["single"], "model.safetensors"))
    assert isinstance(st, SafetensorsSource) and st.layout == "official"
    for path in (layouts["bin"], os.path.join(layouts["bin"], "pytorch_model.bin"), layouts["bin_sharded"]):
        with pytest.raises(CheckpointError, match="allow_pickle"):
            open_weights(path)


@pytest.mark.parametrize("dtype", ["uint16", "complex64"])
def test_pickle_unsupported_dtype_names_file_and_key(tmp_path, capsys, tensors, dtype):
    """A .bin tensor of a dtype safetensors tags cannot express is an error naming file, key and dtype (it used
    to be labelled F32 by the loader); the converter reports the same in one line."""
    import torch
    src = str(tmp_path / "src")
    write_ckpt(src, tensors, "bin", files=False)
    path = os.path.join(src, "pytorch_model.bin")
    sd = torch.load(path, weights_only=True)
    sd["model.norm.weight"] = torch.zeros(32, dtype=torch.int32).to(getattr(torch, dtype))
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        open_weights(src, allow_pickle=True)
    msg = str(e.value)
    assert msg.startswith(path) and "'model.norm.weight'" in msg and f"unsupported dtype {dtype}" in msg
    dst = str(tmp_path / "ms")
    assert convert(["--src", src, "--dst", dst, "--allow-pickle"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0] and "'model.norm.weight'" in err[0]
    assert not os.path.exists(dst)


def test_converted_ckpt_shapes_come_from_the_record(layouts):
    """A .ckpt has no header: its keys and shapes come from conversion.json, checked against each loaded shard."""
    from ixc25_ms.weights.layout import read_index
    assert not open_weights(layouts["converted-ckpt"]).shapes_from_files
    assert open_weights(layouts["converted-safetensors"]).shapes_from_files
    rec_path = os.path.join(layouts["converted-ckpt"], "conversion.json")
    records = {t["target"]: t for t in json.load(open(rec_path))["tensors"]}
    records["plora_sub_GN"]["target_shape"] = [1, 1, 1, 7]
    _, wm, _ = read_index(layouts["converted-ckpt"])
    src = MsCkptSource(layouts["converted-ckpt"], wm, records, rec_path)
    assert src.shape("plora_sub_GN") == (1, 1, 1, 7)
    with pytest.raises(CheckpointError, match=r"'plora_sub_GN' is BF16 \[1, 1, 1, 32\].*BF16 \[1, 1, 1, 7\]"):
        src.read("plora_sub_GN")


def test_iter_tensors_names_and_unknown_key(layouts, tensors):
    got = dict(iter_tensors(layouts["sharded"], None, names=["plora_sub_GN", "output.weight"]))
    assert set(got) == {"plora_sub_GN", "output.weight"}
    assert got["output.weight"].tobytes() == tensors["output.weight"][1].tobytes()
    with pytest.raises(CheckpointError, match="no key 'nope.weight'"):
        list(iter_tensors(layouts["sharded"], names=["nope.weight"]))


def test_read_raw_is_writable_and_truncation_is_named(tmp_path):
    p = str(tmp_path / "a.safetensors")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(p, {"a": ("F32", a), "b": ("I64", np.arange(3))}, {"format": "pt"})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # written under a temporary name, renamed
    st = SafetensorsFile(p)
    r = st.read_raw("a")
    assert r.flags.writeable and np.array_equal(r, a)
    r[0, 0] = 99  # a copy of its own: the file is untouched
    assert st.read_raw("a")[0, 0] == 0
    assert st.read("b").dtype == np.int64  # integers as stored
    from safetensors.numpy import load_file
    assert np.array_equal(load_file(p)["a"], a)  # the reference reader agrees with our writer
    span = st.span("b")
    os.truncate(p, span.offset + 8)
    with pytest.raises(CheckpointError, match="truncated file while reading key 'b'"):
        st.read_raw("b")


def test_header_builder_layout():
    head, n = header_bytes([("x", "F16", (2, 3), 12), ("y", "BF16", (4,), 8)], {"format": "ms"})
    size = int.from_bytes(head[:8], "little")
    assert len(head) == 8 + size and size % 8 == 0 and n == 20
    assert json.loads(head[8:]) == {"__metadata__": {"format": "ms"},
                                    "x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
                                    "y": {"dtype": "BF16", "shape": [4], "data_offsets": [12, 20]}}
    assert head[8:].startswith(b'{"__metadata__":{"format":"ms"},"x":')


def test_bf16_pair_matches_torch():
    import torch
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -9, 3.4e38, -0.0, np.inf, 1e-40], np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(x), ref)
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]
    assert np.array_equal(widen(ref, "BF16"), torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert widen(ref, "BF16", None) is ref and widen(np.arange(3), "I64").dtype == np.int64
    warn = []
    big = f32_to_bf16(np.array([1e30, 1.0], np.float32))
    assert np.isinf(cast_raw(big, "BF16", "F16", warn, "k")[0]) and "key 'k'" in warn[0]


def test_droppable_buffers_are_the_key_tables_none_rows():
    dropped = [src for src, dst in KEY_TABLE if dst is None]
    assert len(dropped) == 2
    assert is_droppable("model.layers.3.attention.rotary_emb.inv_freq")
    assert is_droppable("model.layers.0.attention.rotary_emb.cos_cached")
    assert is_droppable("vit.vision_tower.vision_model.embeddings.position_ids")
    assert not is_droppable("model.norm.weight") and not is_droppable("lm_head.weight")


def test_loader_skips_droppable_buffers_with_a_prefix():
    """assign_state_dict(prefix='vit.') strips the prefix; the stripped position_ids buffer is still dropped."""
    import mindspore as ms
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.vision import CLIPVisionTower
    from ixc25_ms.weights.loader import assign_state_dict
    from ixc25_ms.weights.spec import vit_parameters
    cfg = IXCConfig.from_dict(TINY)
    state = {k: np.full(s, 0.5, np.float32) for k, s in vit_parameters(cfg).items()}
    state["vit.vision_tower.vision_model.embeddings.position_ids"] = np.arange(1601)[None]
    tower = CLIPVisionTower(cfg.vision, ms.float32)
    assign_state_dict(tower, state, "test", prefix="vit.")
    assert all(np.all(p.asnumpy() == 0.5) for _, p in tower.parameters_and_names())
    state["vit.vision_tower.vision_model.embeddings.extra"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match="unexpected key.*embeddings.extra"):
        assign_state_dict(tower, state, "test", prefix="vit.")

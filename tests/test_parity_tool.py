"""ixc25-parity on the official tiny golden checkpoint: a clean pass, and a corrupted MindSpore-side weight."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from ixc25_ms.weights.safetensors import SafetensorsFile, write_safetensors  # noqa: E402
from ixc25_ms.weights.tags import to_st  # noqa: E402
from ixc25_ms.parity import (LazyWeights, compare_chunked, estimate_memory, input_geometry,  # noqa: E402
                             load_tolerance_table)
from parity_tests.tolerance import compare  # noqa: E402
from scripts.parity import main  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official-tiny")
FILES = ("config.json", "tokenizer.model", "model.safetensors", "input_image.png")
CORRUPT_KEY = "model.layers.1.feed_forward.w2.weight"


def _copy(dst):
    os.makedirs(dst)
    for f in FILES:
        shutil.copy(os.path.join(GOLDEN, f), dst)
    return str(dst)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _copy(tmp_path_factory.mktemp("parity") / "official-tiny")


def test_golden_passes_and_writes_reports(ckpt, tmp_path, capsys):
    js, md = str(tmp_path / "out" / "report.json"), str(tmp_path / "report.md")
    rc = main(["--model", ckpt, "--image", os.path.join(ckpt, "input_image.png"), "--steps", "4",
               "--report", js, "--report", md])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS: all" in out and "llm.layers.1.mlp" in out
    rep = json.load(open(js))
    assert rep["passed"] and rep["first_failure"] is None and rep["n_failed"] == 0
    names = [r["module"] for r in rep["rows"]]
    # fixed capture order: vision, wrapped embeddings, decoder layers (attention, mlp, output), head, generation
    assert names == ["image0.pixel_values", "image0.vit.views", "image0.vit.embeddings", "image0.vit.pre_layrnorm",
                     "image0.vit.layers.0", "image0.vit.layers.1", "image0.vit_out_with_GN", "image0.img_embeds",
                     "llm.inputs_embeds",
                     "llm.layers.0.attention", "llm.layers.0.mlp", "llm.layers.0",
                     "llm.layers.1.attention", "llm.layers.1.mlp", "llm.layers.1",
                     "llm.norm", "llm.logits", "generate.step1.logits", "generate.step2.logits",
                     "generate.step3.logits", "generate.greedy_ids"]
    rows = {r["module"]: r for r in rep["rows"]}
    assert rows["image0.pixel_values"]["max_abs"] == 0.0
    assert rows["llm.logits"]["shape"] == [1, 1267, 400] and rows["llm.logits"]["rel_fro"] < 1e-5
    assert rows["image0.vit_out_with_GN"]["shape"] == [1, 1241, 256]
    assert rep["seq_len"] == 1267 and rep["n_image_tokens"] == 1241
    # the official greedy ids of the golden case start 118, 229, 302, 118
    case = json.load(open(os.path.join(GOLDEN, "case.json")))
    assert rep["greedy_ids"]["ours"] == rep["greedy_ids"]["ref"] == case["new_token_ids"][:4]
    text = open(md).read()
    assert text.startswith("# ixc25-parity report") and "**PASS" in text
    assert "| 13 | `llm.layers.1.mlp` |" in text and "ixc25-parity --model" in text


def test_corrupted_decoder_weight_is_named_first(ckpt, tmp_path, capsys):
    """One weight of decoder layer 1's feed_forward.w2 changed in the MindSpore copy only (graph mode: the
    per-layer rows come from the cells, llm.norm/logits and decoding from the jit prefill/decode)."""
    bad = _copy(tmp_path / "corrupt")
    st = SafetensorsFile(os.path.join(ckpt, "model.safetensors"))
    tensors = {k: to_st(st.read_raw(k).copy()) for k in st.keys()}
    w = tensors[CORRUPT_KEY][1]
    w[3, 5] += 0.5
    write_safetensors(os.path.join(bad, "model.safetensors"), tensors)
    js, md = str(tmp_path / "bad.json"), str(tmp_path / "bad.md")
    rc = main(["--model", ckpt, "--ms-model", bad, "--image", os.path.join(ckpt, "input_image.png"),
               "--steps", "2", "--mode", "graph", "--report", js, "--report", md])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL: first failing module: llm.layers.1.mlp" in out
    rep = json.load(open(js))
    assert not rep["passed"] and rep["first_failure"] == "llm.layers.1.mlp"
    names = [r["module"] for r in rep["rows"]]
    first = names.index("llm.layers.1.mlp")
    assert all(r["pass"] for r in rep["rows"][:first])  # everything before it still agrees
    assert rep["mode"] == "graph"
    for later in ("llm.layers.1", "llm.norm", "llm.logits"):
        assert not rep["rows"][names.index(later)]["pass"]
    assert "first failing module: llm.layers.1.mlp" in open(md).read()


def test_tolerance_table_file(tmp_path):
    p = tmp_path / "tol.json"
    p.write_text(json.dumps({"fp16": {"rel_fro": 1e-2}, "modules": {"llm.logits": {"fp16": {"max_abs_rel": 0.1}}}}))
    table, over = load_tolerance_table(str(p))
    assert table["fp16"] == {"rel_fro": 1e-2, "max_abs_rel": 2e-2} and table["fp32"]["rel_fro"] == 1e-5
    assert over == {"llm.logits": {"fp16": {"max_abs_rel": 0.1}}}
    p.write_text(json.dumps({"int8": {"rel_fro": 1e-1}}))
    with pytest.raises(ValueError, match="max_abs_rel"):
        load_tolerance_table(str(p))


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2  # no config.json
    assert main(["--model", GOLDEN, "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "no such config file" in err and "missing.png" in err
    with pytest.raises(SystemExit):
        main(["--model", GOLDEN, "--dtype", "bf16"])


def test_lazy_weights_and_chunked_compare():
    lazy = LazyWeights(GOLDEN, overrides={"extra": np.zeros(2, np.float32)})
    st = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    assert set(lazy) == set(st.keys()) | {"extra"}
    assert lazy[CORRUPT_KEY].shape == tuple(st.shape(CORRUPT_KEY))
    np.testing.assert_array_equal(np.asarray(lazy[CORRUPT_KEY]), st.read(CORRUPT_KEY))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 301)).astype(np.float32)
    b = a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32)
    m, c = compare(a, b), compare_chunked(a, b, chunk=97)
    for k in m:
        assert c[k] == pytest.approx(m[k], rel=1e-9)


def test_memory_estimate(capsys):
    views, seq = input_geometry([os.path.join(GOLDEN, "input_image.png")])
    assert views == 3 and seq - 30 == 1241
    from ixc25_ms.config import IXCConfig
    est = estimate_memory(IXCConfig(), "fp16", seq, views)  # 7B-sized defaults
    assert 10.5e9 < est["parameters"] < 11.5e9
    assert est["ref_weights_gib"] == pytest.approx(2 * est["ms_weights_gib"], abs=0.02)
    assert main(["--model", GOLDEN, "--estimate-memory", "--image", os.path.join(GOLDEN, "input_image.png")]) == 0
    assert '"vit_views": 3' in capsys.readouterr().out


def test_text_only_write_mode(tmp_path):
    js = str(tmp_path / "t.json")
    assert main(["--model", GOLDEN, "--query", "Hello there", "--infer-mode", "write", "--steps", "3",
                 "--report", js]) == 0
    rep = json.load(open(js))
    assert rep["passed"] and rep["n_image_tokens"] == 0 and rep["infer_mode"] == "write"
    assert rep["rows"][0]["module"] == "llm.inputs_embeds" and rep["rows"][-1]["module"] == "generate.greedy_ids"
    assert len(rep["greedy_ids"]["ours"]) == 3

"""The embedded default model: shipped as promised, and right about freshly drawn pictures it never saw."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

import ixc25_ms
from ixc25_ms import shapes as S

D = ixc25_ms.DEFAULT_MODEL
FRESH_SEEDS = range(70_000_000, 70_000_008)  # never drawn for training (scripts/train_default.py: seeds < 10^7)


@pytest.fixture(scope="module")
def model():
    return ixc25_ms.load(D, use_jit=True)


def test_shipped_as_an_official_layout_checkpoint():
    files = sorted(os.listdir(D))
    assert {"config.json", "tokenizer.model", "model.safetensors", "PROVENANCE.md"} <= set(files)
    size = sum(os.path.getsize(os.path.join(D, f)) for f in files)
    assert size <= 12 * 1024 * 1024, size
    prov = open(os.path.join(D, "PROVENANCE.md")).read()
    assert "scripts/train_default.py" in prov
    for name in ("config.json", "tokenizer.model", "model.safetensors"):  # the recorded sha256 of each file
        digest = hashlib.sha256(open(os.path.join(D, name), "rb").read()).hexdigest()
        assert re.search(rf"{digest}\s+{re.escape(name)}", prov), name
    from ixc25_ms.weights.safetensors import SafetensorsFile
    st = SafetensorsFile(os.path.join(D, "model.safetensors"))
    assert {st.dtype_tag(k) for k in st.keys()} == {"F16"}  # widened on load
    cfg = json.load(open(os.path.join(D, "config.json")))
    v = cfg["vision_config"]
    assert (v["model_type"], v["image_size"]) == ("clip_vision_model", 560)  # a CLIP-style ViT at 560 px
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert "model.layers.0.attention.wqkv.Plora_A.weight" in st.keys() and "plora_sub_GN" in st.keys()


def test_turn_markers_are_pieces(model):
    _, tok = model
    for piece in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(piece)) == piece


def test_answers_fresh_pictures(model):
    """Eight pictures drawn here with seeds the training never used, every kind of question (one per turn, with
    history), checked against the drawing: a broken weight, tokenizer, HD transform or layer fails this."""
    m, tok = model
    right, total, wrong = 0, 0, []
    for seed in FRESH_SEEDS:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"ixc25-default-{seed}.png")
        S.render(scene, rng).save(path)
        history = []
        for t, subject, q, want in S.conversation(scene, rng, 4):
            got, history = m.chat(tok, q, [path], history=history, do_sample=False, max_new_tokens=48)
            ok = S.is_correct(t, subject, want, got)
            right, total = right + ok, total + 1
            if not ok:
                wrong.append((seed, q, want, got))
    assert total >= 24
    assert right >= 0.8 * total, f"{right} of {total} right; wrong: {wrong}"


def test_text_only_turn(model):
    m, tok = model
    got, _ = m.chat(tok, "What can you do?", [], do_sample=False, max_new_tokens=40)
    assert "picture" in got.lower() or "colour" in got.lower() or "shape" in got.lower(), got


def test_demo_answers_about_a_drawn_picture(tmp_path, capsys):
    from scripts.demo import main
    assert main(["--seed", "70000100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 70000100" in out and out.count("assistant:") >= 2 and "timings:" in out
    assert "(right:" in out or "(wrong:" in out
    assert os.path.isfile(tmp_path / "shapes-70000100.png")

"""ixc25_ms.testing: the synthetic weights, the memory probes and TinyModelTester."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.weights.spec import expected_parameters
from ixc25_ms.testing import (QUICK_CFG, TinyModelTester, make_image, memory_bandwidth, random_lm_state,
                              reset_peak, synthetic_state, tiny_config, vm)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_needs_neither_mindspore_nor_torch():
    code = ("import sys, ixc25_ms.testing as t, ixc25_ms.parity as p; t.QUICK_CFG; t.vm('VmRSS'); "
            "p.estimate_memory; print('mindspore' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_parity_cli_without_torch():
    """torch is a test extra: the installed ixc25-parity says so in one line (the estimate needs no torch)."""
    golden = os.path.join(REPO, "tests", "data", "official-tiny")
    code = ("import sys; sys.modules['torch'] = None; from ixc25_ms.parity.cli import main; "
            f"print('rc', main(['--model', {golden!r}, '--estimate-memory']), main(['--model', {golden!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split()[-3:] == ["rc", "0", "2"], out.stderr[-2000:]
    assert "ixc25-parity: error: the PyTorch reference needs torch (pip install 'ixc25-ms[test]')" in out.stderr


def test_weights_cover_the_parameter_spec_and_are_seeded():
    t = TinyModelTester(seed=3)
    spec = expected_parameters(t.cfg)
    assert {k: v.shape for k, v in t.state.items()} == spec
    assert all(v.dtype == np.float32 for v in t.state.values())
    again, other = TinyModelTester(seed=3), TinyModelTester(seed=4)
    assert all(np.array_equal(again.state[k], t.state[k]) for k in spec)
    assert not np.array_equal(other.state["output.weight"], t.state["output.weight"])
    # the language-model weights do not depend on whether the tower was drawn too
    lm = TinyModelTester(seed=3).lm_state
    assert set(lm) == {k for k in spec if k.startswith(("model.", "output."))}
    assert all(np.array_equal(lm[k], t.state[k]) for k in lm)
    assert all(np.array_equal(v, random_lm_state(t.cfg, 3)[k]) for k, v in lm.items())
    # scaled init: norms around 1, matrices ~ 1/sqrt(fan_in)
    w = t.state["model.layers.0.feed_forward.w2.weight"]
    assert abs(w.std() * np.sqrt(w.shape[1]) - 1) < 0.1
    assert abs(t.state["model.norm.weight"].mean() - 1) < 0.1


def test_bench_init_and_prefix():
    from ixc25_ms.config import IXCConfig
    cfg = IXCConfig.from_dict(QUICK_CFG)
    full, lm = synthetic_state(cfg, 0), synthetic_state(cfg, 0, lm_only=True)
    assert set(lm) < set(full) and all(np.array_equal(lm[k], full[k]) for k in lm)
    assert np.all(full["model.norm.weight"] == 1) and np.all(full["vision_proj.0.bias"] == 0)
    assert abs(full["output.weight"].std() - 0.02) < 1e-3
    t = TinyModelTester(QUICK_CFG, seed=0, init="bench")
    assert all(np.array_equal(t.lm_state[k], lm[k]) for k in lm)
    with pytest.raises(ValueError, match="init must be one of"):
        TinyModelTester(init="xavier")


def test_checkpoint_loads_and_matches_the_reference(tmp_path):
    import torch
    t = TinyModelTester(vocab_size=400, seed=1)
    d = t.write_checkpoint(str(tmp_path / "ckpt"))  # a tiny tokenizer trained on the spot
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.load(open(os.path.join(d, "config.json")))["architectures"] == ["InternLMXComposer2ForCausalLM"]
    model, tok = ixc25_ms.load(d)
    assert tok.vocab_size == 400
    ids = np.array([[1, 5, 77, 300, 12]])
    ours = model(model.embed(ids)).logits.asnumpy()
    ref = t.ref_lm()
    want = ref.forward(ref.embed(ids))[0].numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)
    lm = t.ms_lm()
    np.testing.assert_array_equal(lm(lm.embed(ids)).asnumpy(), ours)
    pv = np.random.default_rng(0).standard_normal((1, 3, 560, 560)).astype(np.float32)
    lay_ref, emb_ref = t.ref_vision().encode(pv)
    np.testing.assert_allclose(model.img2emb(pv).asnumpy(), emb_ref.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="below the tiny tokenizer's minimum"):
        TinyModelTester().write_checkpoint(str(tmp_path / "small"))  # vocab 128


def test_tiny_config_overrides():
    cfg = tiny_config(num_hidden_layers=3, vision_config={"hidden_size": 16, "intermediate_size": 32,
                                                          "num_hidden_layers": 1, "num_attention_heads": 2})
    assert cfg.num_hidden_layers == 3 and cfg.vision.hidden_size == 16 and tiny_config().num_hidden_layers == 2


def test_memory_probes_and_image():
    assert vm("VmRSS") > 0 and vm("VmHWM") >= vm("VmRSS") - 1  # MiB; the peak is never below the current
    if sys.platform.startswith("linux"):
        assert reset_peak()
    assert memory_bandwidth(mb=8, repeats=2) > 1e8  # bytes/s
    img = make_image()
    assert img.shape == (300, 700, 3) and img.dtype == np.uint8 and np.array_equal(img, make_image())

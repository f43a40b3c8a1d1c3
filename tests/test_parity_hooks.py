"""ixc25_ms.parity's hook capture: rows equal the layer calls they replaced, guards, any tower's rows (timm ViT)."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor, nn
from PIL import Image, ImageDraw

pytest.importorskip("torch")

from ixc25_ms.parity import ActivationStore, run_parity  # noqa: E402
from ixc25_ms.parity.cli import main  # noqa: E402
from ixc25_ms.parity.estimate import input_geometry, tower_geometry  # noqa: E402
from ixc25_ms.parity.hooks import INPUT, OUTPUT, capture, layer_stack, llm_taps, tower_taps  # noqa: E402
from ixc25_ms.parity.ms_side import build_ms_model, run_mindspore  # noqa: E402
from ixc25_ms.testing import TinyModelTester  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official-tiny")
IMAGE = os.path.join(GOLDEN, "input_image.png")
TIMM_VISION = {"model_type": "timm_vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4}  # 448 px / patch 16 (the tower's defaults): 28x28 patches, 785 tokens


def _manual_rows(model, store):
    """The rows as the tool computed them before hooks: each cell called by hand, residuals added here."""
    vm = model.vit.vision_tower.vision_model
    out = {}
    x = vm.embeddings(Tensor(store.load("image0.vit.views")))
    out["image0.vit.embeddings"] = x.asnumpy()
    x = vm.pre_layrnorm(x)
    out["image0.vit.pre_layrnorm"] = x.asnumpy()
    for j, layer in enumerate(vm.encoder.layers):
        x = layer(x)
        out[f"image0.vit.layers.{j}"] = x.asnumpy()
    h = Tensor(store.load("llm.inputs_embeds"))
    im_mask = np.load(os.path.join(store.root, "im_mask.npy"))
    b, l = h.shape[0], h.shape[1]
    imt, cos, sin, mask, _ = model.sequence_inputs(b, l, im_mask)
    for j, layer in enumerate(model.model.layers):
        a = layer.attention(layer.attention_norm(h), imt, cos, sin, mask, "base")
        out[f"llm.layers.{j}.attention"] = a.asnumpy()
        h = h + a
        f = layer.feed_forward(layer.ffn_norm(h), imt, "base")
        out[f"llm.layers.{j}.mlp"] = f.asnumpy()
        h = h + f
        out[f"llm.layers.{j}"] = h.asnumpy()
    return out


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_hook_rows_equal_the_layer_calls_on_golden(tmp_path, mode):
    store = ActivationStore(str(tmp_path / "acts"))
    run_mindspore(GOLDEN, [IMAGE], "Describe this image in detail.", store, mode=mode, steps=2, log=lambda *a: None)
    names = [r["name"] for r in store.rows]
    assert names[:9] == ["image0.pixel_values", "image0.vit.views", "image0.vit.embeddings",
                         "image0.vit.pre_layrnorm", "image0.vit.layers.0", "image0.vit.layers.1",
                         "image0.vit_out_with_GN", "image0.img_embeds", "llm.inputs_embeds"]
    model, _ = build_ms_model(GOLDEN, "float32", False)
    manual = _manual_rows(model, store)
    assert len(manual) == 4 + 3 * 2
    for name, want in manual.items():
        got = store.load(name)
        assert got.shape == want.shape and np.array_equal(got, want), name  # the same kernels on the same inputs


def test_capture_guards():
    class Twice(nn.Cell):
        def __init__(self):
            super().__init__()
            self.inner = nn.Dense(2, 2)

        def construct(self, x):
            return self.inner(self.inner(x))

    net, x, saved = Twice(), Tensor(np.ones((1, 2), np.float32)), []
    with pytest.raises(RuntimeError, match="'twice' fired twice"):
        with capture([("twice", net.inner, OUTPUT)], lambda n, v: saved.append(n)):
            net(x)
    with pytest.raises(RuntimeError, match=r"rows \['never'\] were not produced"):
        with capture([("never", net.inner, INPUT)], lambda n, v: saved.append(n)):
            pass
    saved.clear()
    net(x)  # every hook is gone after the block
    assert saved == []
    with pytest.raises(ValueError, match="'where'"):
        with capture([("x", net.inner, "middle")], lambda n, v: None):
            pass


class _NoStack(nn.Cell):
    """A 'tower' without a layer stack."""

    def __init__(self):
        super().__init__()
        self.cfg = type("C", (), {"num_hidden_layers": 2})()
        self.one = nn.Dense(2, 2)


def test_taps_of_each_tower_and_the_llm():
    clip = TinyModelTester().ms_model()
    assert [(n, w) for n, _, w in tower_taps(clip.vit)] == [
        ("vit.embeddings", OUTPUT), ("vit.pre_layrnorm", OUTPUT), ("vit.layers.0", OUTPUT), ("vit.layers.1", OUTPUT)]
    assert tower_taps(clip.vit)[2][1] is clip.vit.vision_tower.vision_model.encoder.layers[0]
    timm = TinyModelTester(vision_config=TIMM_VISION).ms_model()
    taps = tower_taps(timm.vit)
    assert [(n, w) for n, _, w in taps] == [("vit.embeddings", INPUT), ("vit.layers.0", OUTPUT),
                                            ("vit.layers.1", OUTPUT)]
    assert taps[0][1] is timm.vit.vision_tower.blocks[0]  # what block 0 receives: patches + cls + positions
    assert [n for n, _, _ in llm_taps(clip)] == [f"llm.layers.{j}{s}" for j in range(2)
                                                 for s in (".attention", ".mlp", "")]
    with pytest.raises(ValueError, match="expected one CellList of 2 encoder layers"):
        layer_stack(_NoStack())


def _picture(path):
    img = Image.new("RGB", (700, 300), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 200, 700, 300], fill=(70, 160, 60))
    d.ellipse([520, 30, 620, 130], fill=(250, 210, 40))
    d.polygon([(110, 120), (210, 50), (310, 120)], fill=(120, 60, 30))
    img.save(path)
    return str(path)


def test_timm_tower_rows_and_geometry(tmp_path, capsys):
    """A checkpoint with the timm ViT tower (448/16): per-layer ViT rows captured by hooks and compared with the
    timm reference; the input geometry and the memory estimate follow the tower's geometry."""
    tester = TinyModelTester(vocab_size=400, vision_config=TIMM_VISION, seed=5)
    ckpt = tester.write_checkpoint(str(tmp_path / "timm"), tokenizer=os.path.join(GOLDEN, "tokenizer.model"))
    img = _picture(tmp_path / "house.png")
    rep = run_parity(ckpt, [img], "Describe this image.", steps=2, log=lambda *a: None)
    rows = {r["module"]: r for r in rep["rows"]}
    assert rep["passed"], [r for r in rep["rows"] if not r["pass"]]
    assert [r["module"] for r in rep["rows"][:7]] == [
        "image0.pixel_values", "image0.vit.views", "image0.vit.embeddings", "image0.vit.layers.0",
        "image0.vit.layers.1", "image0.vit_out_with_GN", "image0.img_embeds"]
    assert rows["image0.vit.views"]["shape"] == [3, 3, 448, 448]  # 896x448 canvas: global view + 1x2 crops
    assert rows["image0.vit.layers.1"]["shape"] == [3, 785, 32] and rows["image0.vit.layers.1"]["rel_fro"] < 1e-5
    n_img = 3 * 14 * 14 + 1 + 2 * 14  # (hw+1)*half² + glb_GN + (h+1)*half at half = 448/16/2 = 14
    assert rep["n_image_tokens"] == n_img == 617
    geom = tower_geometry(tester.cfg)
    assert (geom.resolution, geom.patch) == (448, 16)
    assert input_geometry([img], geometry=geom) == (3, 30 + n_img)
    assert input_geometry([img]) == (3, 30 + 1241)  # the official 560/14 view: 1x2 crops as well, 1,241 tokens
    assert main(["--model", ckpt, "--estimate-memory", "--image", img]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["vit_views"] == 3 and est["seq_len"] == 30 + n_img

"""The vision-tower seam: registry, CLIP at another geometry, and a second tower (timm ViT 448/16) end to end."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mindspore import Tensor
from PIL import Image, ImageDraw

import ixc25_ms
from ixc25_ms.weights.safetensors import write_safetensors
from ixc25_ms.config import ConfigError, IXCConfig
from ixc25_ms.weights.spec import expected_parameters
from ixc25_ms.processing import preprocess_image
from ixc25_ms.vision import TOWERS, TimmViTTower, ViewGeometry, encode_pixels, expected_tokens, split_views, \
    tower_spec
from ixc25_ms.vision.vit_spec import TimmViTSpec
from parity_tests.reference.language import RefLM
from parity_tests.reference.vision import VisionReference, normalize_rgb
from parity_tests.reference.vit import TimmViTReference
from parity_tests.tolerance import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "official-tiny")
T = "vit.vision_tower."

VIT_CFG = {  # LLM as the golden tiny model (its tokenizer: vocab 400), vision: a 2-block timm ViT at 448/16
    "architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2", "vocab_size": 400,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000, "max_position_embeddings": 4096,
    "lora_r": 8, "lora_alpha": 8, "web_lora_r": 16,
    "vision_config": {"model_type": "timm_vit", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4},
}
# written by hand from timm's VisionTransformer state dict (2 blocks, C=32, mlp 64, 448/16 -> 28x28+1 positions)
TIMM_KEYS = {T + "cls_token": (1, 1, 32), T + "pos_embed": (1, 785, 32), T + "patch_embed.proj.weight": (32, 3, 16, 16),
             T + "patch_embed.proj.bias": (32,), T + "norm.weight": (32,), T + "norm.bias": (32,)}
for _n in range(2):
    TIMM_KEYS.update({f"{T}blocks.{_n}.{k}": s for k, s in {
        "norm1.weight": (32,), "norm1.bias": (32,), "attn.qkv.weight": (96, 32), "attn.qkv.bias": (96,),
        "attn.proj.weight": (32, 32), "attn.proj.bias": (32,), "norm2.weight": (32,), "norm2.bias": (32,),
        "mlp.fc1.weight": (64, 32), "mlp.fc1.bias": (64,), "mlp.fc2.weight": (32, 64), "mlp.fc2.bias": (32,)}.items()})


def random_state(shapes, seed):
    """Seeded weights scaled so activations stay O(1): norms ~1, embeddings ~N(0,1), linears ~1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "_norm.weight")):
            a = 1.0 + 0.1 * rng.standard_normal(s)
        elif k.endswith(("tok_embeddings.weight", "_GN", "cls_token", "pos_embed")):
            a = rng.standard_normal(s)
        elif len(s) == 1:
            a = 0.1 * rng.standard_normal(s)
        else:
            a = rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))
        out[k] = a.astype(np.float32)
    return out


def write_checkpoint(d, cfg_dict, state):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    shutil.copyfile(os.path.join(GOLDEN, "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    write_safetensors(os.path.join(d, "model.safetensors"), {k: ("F32", v) for k, v in state.items()},
                      {"format": "pt"})


def drawn_picture(path, size=(700, 300)):
    img = Image.new("RGB", size, (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 200, size[0], size[1]], fill=(70, 160, 60))
    d.ellipse([520, 30, 620, 130], fill=(250, 210, 40))
    d.rectangle([120, 120, 300, 240], fill=(200, 30, 30))
    d.polygon([(110, 120), (210, 50), (310, 120)], fill=(120, 60, 30))
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------ registry and config
def test_registry_entries_and_mindspore_free_import():
    assert set(TOWERS) == {"clip_vision_model", "timm_vit"}
    assert tower_spec().model_type == "clip_vision_model"
    with pytest.raises(ConfigError, match="unknown 'model_type' 'nope'"):
        tower_spec("nope")
    code = ("import sys; from ixc25_ms.config import IXCConfig; from ixc25_ms.vision import registry; "
            "import ixc25_ms.weights.spec; import ixc25_ms.weights.keys; "
            f"c = IXCConfig.from_dict({VIT_CFG!r}); registry.vision_parameters(c.vision); "
            "print('mindspore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_key_slot_clash_is_refused(monkeypatch):
    from ixc25_ms.vision import registry
    monkeypatch.setattr(TimmViTSpec, "key_slots", dict(TimmViTSpec.key_slots, fc=r"fc[123]"))
    with pytest.raises(ValueError, match="key slot 'fc'"):
        registry.key_slots()


def test_timm_spec_names_match_timm():
    cfg = IXCConfig.from_dict(VIT_CFG)
    assert TimmViTSpec.parameters(cfg.vision) == TIMM_KEYS
    vit = TimmViTTower(cfg.vision)
    assert {"vit." + n: tuple(p.shape) for n, p in vit.parameters_and_names()} == TIMM_KEYS
    assert (vit.resolution, vit.patch_size, vit.grid, vit.geometry.half) == (448, 16, 28, 14)


def test_encode_pixels_needs_a_tower():
    with pytest.raises(TypeError, match="vision tower cell"):
        encode_pixels(object(), None, None, None, np.zeros((1, 3, 448, 448), np.float32))


# ------------------------------------------------------------------------------------------ CLIP at 448/16
def test_clip_at_448_patch_16_vs_reference():
    """The CLIP tower and the layout at a non-official geometry (28x28 grid) against the torch reference."""
    from ixc25_ms.weights.loader import assign_state_dict
    from ixc25_ms.vision import CLIPVisionTower, build_vision_proj
    cfg = IXCConfig.from_dict(dict(VIT_CFG, vision_config={"hidden_size": 32, "intermediate_size": 48,
                                                           "num_hidden_layers": 1, "num_attention_heads": 2,
                                                           "image_size": 448, "patch_size": 16}))
    sd = random_state({k: s for k, s in expected_parameters(cfg).items()
                       if k.startswith(("vit.", "vision_proj.", "plora_"))}, 3)
    vit = CLIPVisionTower(cfg.vision)
    assign_state_dict(vit, sd, "random", prefix="vit.")
    proj = build_vision_proj(cfg.vit_merged_dim, cfg.hidden_size)
    assign_state_dict(proj, sd, "random", prefix="vision_proj.")
    pv = np.random.default_rng(4).standard_normal((1, 3, 896, 448)).astype(np.float32)  # a 2x1 crop grid
    emb, lay = encode_pixels(vit, proj, sd["plora_glb_GN"], sd["plora_sub_GN"], pv, return_layout=True)
    lay_ref, emb_ref = VisionReference(sd, cfg.vision).encode(pv)
    assert emb.shape == (1, expected_tokens(2, 1, ViewGeometry(448, 16)), 64) == (1, 3 * 196 + 1 + 3 * 14, 64)
    assert_close(lay, lay_ref, "fp32", "CLIP 448/16 layout")
    assert_close(emb, emb_ref, "fp32", "CLIP 448/16 img_embeds")


def test_processing_at_448():
    from ixc25_ms.processing import hd_plan
    from ixc25_ms.video import video_transform
    # 700x300, hd 24: scale min(ceil(700/448)=2, 7) = 2 -> 896 x int(896/(7/3)) = 384, padded to 896x448
    assert hd_plan(700, 300, 24, crop=448) == (896, 384)
    assert preprocess_image(np.zeros((300, 700, 3), np.uint8), 24, crop=448).shape == (1, 3, 448, 896)
    assert video_transform(Image.new("RGB", (1000, 500)), crop=448).size == (896, 448)  # 448 short, pad 896
    with pytest.raises(ValueError, match="crop"):
        hd_plan(700, 300, 24, crop=0)


# ------------------------------------------------------------------------------------------ timm ViT end to end
@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("timm") / "ckpt")
    cfg = IXCConfig.from_dict(VIT_CFG)
    shapes = {k: s for k, s in expected_parameters(cfg).items() if not k.startswith("vit.")}
    shapes.update(TIMM_KEYS)
    state = random_state(shapes, 11)
    write_checkpoint(d, VIT_CFG, state)
    img = drawn_picture(str(tmp_path_factory.mktemp("img") / "house.png"))
    model, tok = ixc25_ms.load(d)
    return d, cfg, state, img, model, tok


def test_timm_image_path_vs_reference(vit_ckpt):
    _, cfg, state, img, model, _ = vit_ckpt
    geom = model.vit.geometry
    pv = preprocess_image(img, 24, crop=model.vit.resolution)
    # the HD crops are 448 px: the reference pixels are resized and padded here with PIL directly
    canvas = Image.new("RGB", (896, 448), (255, 255, 255))
    canvas.paste(Image.open(img).convert("RGB").resize((896, 384), Image.Resampling.BILINEAR), (0, 0))
    want_pv = normalize_rgb(np.asarray(canvas)).numpy()
    assert pv.shape == (1, 3, 448, 896) and np.array_equal(pv, want_pv)
    ref = TimmViTReference(state, cfg.vision)
    views = split_views(pv, geom)
    views_ref, h, w = ref.views(torch.from_numpy(pv), 448)
    assert (h, w) == (1, 2) and views.shape == (3, 3, 448, 448)
    m = assert_close(views, views_ref, "fp32", "timm views")
    feats_ref = ref.tower(views_ref)
    for mode in ("pynative", "jit"):
        x = Tensor(views)
        feats = model.vit.forward_jit(x) if mode == "jit" else model.vit(x)
        assert feats.shape == (3, 784, 32)
        m = assert_close(feats, feats_ref, "fp32", f"timm tower ({mode})")
        assert m["rel_fro"] <= 1e-5
    emb, lay = encode_pixels(model.vit, model.vision_proj, model.plora_glb_GN, model.plora_sub_GN, pv,
                             return_layout=True)
    lay_ref, emb_ref = ref.encode(pv)
    n = 3 * 14 * 14 + 1 + 2 * 14  # (hw+1)*half² + glb_GN + (h+1)*half, half = 448/16/2 = 14
    assert lay.shape == (1, n, 128) and emb.shape == (1, n, 64) and expected_tokens(1, 2, geom) == n
    for got, want, name in ((lay, lay_ref, "layout"), (emb, emb_ref, "img_embeds")):
        m = assert_close(got, want, "fp32", f"timm {name}")
        assert m["rel_fro"] <= 1e-5
    assert_close(model.img2emb(pv), emb_ref, "fp32", "timm img2emb")


def test_timm_chat_greedy_vs_reference(vit_ckpt):
    _, cfg, state, img, model, tok = vit_ckpt
    query = "Describe this image."
    inputs, im_mask, n_tok = model.interleav_wrap_chat(query, [img])
    text = tok(f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
               add_special_tokens=False).input_ids
    n_img = 617  # 896x448 -> 1x2 crops of 448 px: 3*196 + 1 + 2*14
    m = im_mask.asnumpy()[0]
    assert n_tok == 1 + n_img + len(text) and int(m.sum()) == n_img and m[1:1 + n_img].all()
    # reference prompt: BOS, reference image embeddings, text
    ref_lm = RefLM(cfg, state)
    canvas = Image.new("RGB", (896, 448), (255, 255, 255))
    canvas.paste(Image.open(img).convert("RGB").resize((896, 384), Image.Resampling.BILINEAR), (0, 0))
    _, emb_ref = TimmViTReference(state, cfg.vision).encode(normalize_rgb(np.asarray(canvas)).numpy())
    embeds = torch.cat([ref_lm.embed([[1]]), emb_ref, ref_lm.embed([text])], dim=1)
    assert_close(inputs["inputs_embeds"], embeds, "fp32", "timm prompt embeddings")
    im = torch.from_numpy(m[None].copy())
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]")]
    ids, margins = [], []
    for _ in range(4):  # uncached reference greedy decoding
        logits = ref_lm.forward(embeds, im)[0][0, -1]
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
        if ids[-1] in eos:
            break
        embeds = torch.cat([embeds, ref_lm.embed([[ids[-1]]])], dim=1)
        im = torch.cat([im, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    print(f"[parity] timm greedy ids {ids}, top-2 logit margins {margins}")
    assert min(margins) > 1e-3  # no near-ties: greedy ids are a strict check
    got = model.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, max_new_tokens=4,
                         repetition_penalty=1.0, eos_token_id=eos)[0].tolist()
    assert got[0] == ids[0] and got == ids
    resp, _ = model.chat(tok, query, [img], do_sample=False, max_new_tokens=4, repetition_penalty=1.0)
    assert resp == tok.decode(got, skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0]


def test_timm_param_spec_and_converter_round_trip(vit_ckpt, tmp_path):
    """The whole-model spec carries the tower's keys; official -> MindSpore -> official keeps every tensor."""
    from converters.convert import convert_to_ms, convert_to_torch
    from ixc25_ms.weights.keys import ms_to_official, official_to_ms
    from ixc25_ms.weights.layout import load_state_dict
    src, cfg, state, img, model, _ = vit_ckpt
    spec = expected_parameters(cfg)
    assert {k: s for k, s in spec.items() if k.startswith("vit.")} == TIMM_KEYS
    assert spec == {k: v.shape for k, v in state.items()}
    assert all(official_to_ms(k) == k == ms_to_official(k) for k in TIMM_KEYS)
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    convert_to_ms(src, ms_dir)
    convert_to_torch(ms_dir, back)
    got = load_state_dict(back)
    assert set(got) == set(state) and all(np.array_equal(got[k], state[k]) for k in state)
    again, _ = ixc25_ms.load(ms_dir)  # the converted layout loads into the same tower
    pv = preprocess_image(img, 24, crop=448)
    assert np.array_equal(again.img2emb(pv).asnumpy(), model.img2emb(pv).asnumpy())


def test_gradient_checkpointing_covers_every_tower_layer(vit_ckpt):
    """--gradient_checkpointing marks every decoder layer and every encoder layer of the tower for recompute,
    whatever the tower calls its layer list (CLIP: encoder.layers, timm: blocks)."""
    from ixc25_ms.train.prepare import use_recompute
    model, _ = ixc25_ms.load(vit_ckpt[0])  # a model of its own: recompute marks stay on the cells
    n_llm, n_vit = model.cfg.num_hidden_layers, model.cfg.vision.num_hidden_layers
    assert len(model.vit.vision_tower.blocks) == n_vit
    assert use_recompute(model) == n_llm + n_vit

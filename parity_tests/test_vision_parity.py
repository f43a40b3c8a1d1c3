"""Vision parity: MindSpore vision path vs our PyTorch reference and vs the official golden tensors."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mindspore import Parameter, Tensor

from ixc25_ms.config import IXCConfig, VisionConfig
from ixc25_ms.processing import bicubic_resize, bicubic_resize_matrices, preprocess_image
from ixc25_ms.vision import (CLIPVisionTower, build_vision_proj, encode_pixels, expected_tokens,
                             global_local_layout, split_views)
from ixc25_ms.weights import CheckpointError
from ixc25_ms.weights.layout import load_state_dict
from ixc25_ms.weights.loader import assign_state_dict
from parity_tests.reference.vision import VisionReference
from parity_tests.tolerance import assert_close, compare

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "official-tiny")
DTYPES = {"fp32": ms.float32, "fp16": ms.float16}


@pytest.fixture(scope="module")
def golden():
    cfg = IXCConfig.from_file(DATA)
    sd = load_state_dict(DATA)
    exp = dict(np.load(os.path.join(DATA, "expected.npz")))
    return cfg, sd, exp


@pytest.fixture(scope="module")
def ref(golden):
    cfg, sd, _ = golden
    return VisionReference(sd, cfg.vision)


_MODELS = {}


def ms_parts(golden, dt):
    """(vit, proj, glb_GN, sub_GN) in dtype dt, built once per module."""
    if dt not in _MODELS:
        cfg, sd, _ = golden
        vit = CLIPVisionTower(cfg.vision, DTYPES[dt])
        assign_state_dict(vit, sd, "golden", prefix="vit.")
        proj = build_vision_proj(cfg.vit_merged_dim, cfg.hidden_size, DTYPES[dt])
        assign_state_dict(proj, sd, "golden", prefix="vision_proj.")
        glb = Parameter(Tensor(sd["plora_glb_GN"]).astype(DTYPES[dt]), name="plora_glb_GN")
        sub = Parameter(Tensor(sd["plora_sub_GN"]).astype(DTYPES[dt]), name="plora_sub_GN")
        _MODELS[dt] = (vit, proj, glb, sub)
    return _MODELS[dt]


def rand(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- preprocessing rows
def test_pixel_values_match_golden(golden):
    _, _, exp = golden
    pv = preprocess_image(os.path.join(DATA, "input_image.png"), hd_num=24)
    m = compare(pv, exp["pixel_values"])
    print(f"[parity] pixel_values: max_abs={m['max_abs']:.3e} rel_fro={m['rel_fro']:.3e}")
    assert pv.shape == exp["pixel_values"].shape and pv.dtype == np.float32
    assert m["max_abs"] == 0.0


@pytest.mark.parametrize("src,dst", [((560, 1120), (560, 560)), ((1680, 560), (560, 560)), ((1120, 1120), (560, 560)),
                                     ((560, 560), (560, 560)), ((7, 9), (20, 3)), ((33, 17), (5, 64)),
                                     ((1, 4), (3, 1))])
def test_bicubic_matrices_vs_torch(src, dst):
    x = rand((1, 3) + src, 1)
    want = F.interpolate(torch.from_numpy(x), size=dst, mode="bicubic", align_corners=False).numpy()
    mh, mw = bicubic_resize_matrices(src[0], src[1], dst[0], dst[1])
    assert mh.shape == (dst[0], src[0]) and mw.shape == (dst[1], src[1])
    np.testing.assert_allclose(mh.sum(1), 1.0, atol=1e-6)  # interpolation weights are a partition of unity
    got = mh @ x.astype(np.float64) @ mw.T
    assert_close(got, want, "fp32", f"bicubic {src}->{dst}")
    assert_close(bicubic_resize(x, *dst), want, "fp32", f"bicubic_resize {src}->{dst}")


def test_bicubic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="out_h"):
        bicubic_resize_matrices(4, 4, 0, 4)
    with pytest.raises(ValueError, match="in_w"):
        bicubic_resize_matrices(4, 2.5, 4, 4)


# ---------------------------------------------------------------- tower rows
def test_parameter_names_match_checkpoint(golden):
    cfg, sd, _ = golden
    vit, proj, _, _ = ms_parts(golden, "fp32")
    ckpt = sorted(k[len("vit."):] for k in sd if k.startswith("vit."))
    assert sorted(p.name for p in vit.get_parameters()) == ckpt
    assert sorted(n for n, _ in vit.parameters_and_names()) == ckpt
    assert [p.name for p in proj.get_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]

    class Owner(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.vit = CLIPVisionTower(cfg.vision, ms.float16)
            self.vision_proj = build_vision_proj(cfg.vit_merged_dim, cfg.hidden_size, ms.float16)

    owner = Owner()
    want = sorted(k for k in sd if k.startswith(("vit.", "vision_proj.")))
    assert sorted(p.name for p in owner.get_parameters()) == want
    assert {p.dtype for p in owner.get_parameters()} == {ms.float16}


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_patch_embedding(golden, ref, dt):
    vit = ms_parts(golden, dt)[0]
    x = rand((2, 3, 560, 560), 2)
    got = vit.vision_tower.vision_model.embeddings(Tensor(x).astype(DTYPES[dt]))
    want = ref.embed(torch.from_numpy(x))
    assert got.shape == (2, 1601, 64) and got.dtype == DTYPES[dt]
    assert_close(got, want, dt, "patch embedding")


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_one_encoder_layer(golden, ref, dt):
    vit = ms_parts(golden, dt)[0]
    x = rand((2, 1601, 64), 3)
    got = vit.vision_tower.vision_model.encoder.layers[0](Tensor(x).astype(DTYPES[dt]))
    want = ref.layer(0, torch.from_numpy(x))
    assert_close(got, want, dt, "encoder layer 0")


@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_full_tower(golden, ref, dt, mode):
    vit = ms_parts(golden, dt)[0]
    x = rand((2, 3, 560, 560), 4)
    t = Tensor(x)
    got = vit.forward_jit(t) if mode == "jit" else vit(t)
    want = ref.tower(torch.from_numpy(x))
    assert got.shape == (2, 1600, 64) and got.dtype == DTYPES[dt]
    assert_close(got, want, dt, f"vision tower ({mode})")


def test_gelu_config_random_weights():
    """A second config (exact gelu, 2 heads, 1 layer) with random weights, to cover the other branches."""
    cfg = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       hidden_act="gelu", layer_norm_eps=1e-6)
    vit = CLIPVisionTower(cfg, "fp32")
    rng = np.random.default_rng(5)
    sd = {"vit." + n: (rng.standard_normal(p.shape) * 0.1 + (1.0 if n.endswith("norm1.weight") else 0.0))
          .astype(np.float32) for n, p in vit.parameters_and_names()}
    assign_state_dict(vit, sd, "golden", prefix="vit.")
    x = rand((1, 3, 560, 560), 6)
    assert_close(vit(Tensor(x)), VisionReference(sd, cfg).tower(torch.from_numpy(x)), "fp32", "gelu tower")


# ---------------------------------------------------------------- layout and projector rows
def test_gn_layout_vs_reference_and_positions(golden, ref):
    _, sd, _ = golden
    h, w = 2, 3
    feats = rand((1 + h * w, 1600, 64), 7)
    got = global_local_layout(Tensor(feats), h, w, Tensor(sd["plora_glb_GN"]), Tensor(sd["plora_sub_GN"]))
    want = ref.layout(torch.from_numpy(feats), h, w)
    assert got.shape == (1, expected_tokens(h, w), 256)
    m = compare(got, want)
    print(f"[parity] GN layout: max_abs={m['max_abs']:.3e}")
    assert m["max_abs"] == 0.0
    g = got.asnumpy()[0]
    sub, glb = sd["plora_sub_GN"].reshape(-1), sd["plora_glb_GN"].reshape(-1)
    # global row r ends with sub_GN at 21r+20; glb_GN at 420; local rows of 20*w+1 tokens
    assert all(np.array_equal(g[21 * r + 20], sub) for r in range(20))
    assert np.array_equal(g[420], glb)
    row = 20 * w + 1
    assert all(np.array_equal(g[421 + row * r + 20 * w], sub) for r in range(20 * h))
    # merged token (i,j) of crop (ci,cj) holds patches (2i+dy, 2j+dx) in order (0,0),(0,1),(1,0),(1,1)
    ci, cj, i, j = 1, 2, 3, 5
    tok = g[421 + row * (20 * ci + i) + 20 * cj + j]
    grid = feats[1 + ci * w + cj].reshape(40, 40, 64)
    want_tok = np.concatenate([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j],
                               grid[2 * i + 1, 2 * j + 1]])
    assert np.array_equal(tok, want_tok)


def test_layout_rejects_wrong_view_count(golden):
    _, sd, _ = golden
    with pytest.raises(ValueError, match="views"):
        global_local_layout(Tensor(rand((3, 1600, 64), 8)), 2, 2, Tensor(sd["plora_glb_GN"]),
                            Tensor(sd["plora_sub_GN"]))


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_projector(golden, ref, dt):
    proj = ms_parts(golden, dt)[1]
    x = rand((1, 50, 256), 9)
    assert_close(proj(Tensor(x).astype(DTYPES[dt])), ref.project(torch.from_numpy(x)), dt, "vision_proj")


# ---------------------------------------------------------------- end to end vs golden
def test_reference_reproduces_golden(golden, ref):
    _, _, exp = golden
    lay, emb = ref.encode(exp["pixel_values"])
    assert_close(lay, exp["vit_out_with_GN"], "fp32", "torch reference vit_out_with_GN")
    assert_close(emb, exp["img_embeds"], "fp32", "torch reference img_embeds")


@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_golden_end_to_end(golden, dt, mode):
    _, _, exp = golden
    vit, proj, glb, sub = ms_parts(golden, dt)
    pv = preprocess_image(os.path.join(DATA, "input_image.png"))
    emb, lay = encode_pixels(vit, proj, glb, sub, pv, use_jit=(mode == "jit"), return_layout=True)
    assert emb.shape == (1, 1241, 64) and emb.dtype == DTYPES[dt]
    m1 = assert_close(lay, exp["vit_out_with_GN"], dt, f"golden vit_out_with_GN ({mode})")
    m2 = assert_close(emb, exp["img_embeds"], dt, f"golden img_embeds ({mode})")
    if dt == "fp32":
        assert m1["rel_fro"] <= 1e-5 and m2["rel_fro"] <= 1e-5


def test_multi_crop_grid_vs_reference(golden, ref):
    """A 2x2 grid (the golden case is 1x2): crop order and tiling against the torch reference."""
    vit, proj, glb, sub = ms_parts(golden, "fp32")
    pv = rand((1, 3, 1120, 1120), 10)
    emb = encode_pixels(vit, proj, glb, sub, pv)
    lay_ref, emb_ref = ref.encode(pv)
    assert emb.shape == (1, expected_tokens(2, 2), 64) == tuple(emb_ref.shape)
    assert_close(emb, emb_ref, "fp32", "2x2 grid img_embeds")


def test_split_views_global_is_torch_bicubic():
    pv = rand((1, 3, 560, 1680), 11)
    v = split_views(pv)
    assert v.shape == (4, 3, 560, 560)
    want = F.interpolate(torch.from_numpy(pv), size=(560, 560), mode="bicubic", align_corners=False).numpy()
    assert_close(v[:1], want, "fp32", "global view")
    np.testing.assert_array_equal(v[3], pv[0, :, :, 1120:])


@pytest.mark.parametrize("shape,msg", [((3, 560, 560), r"\(1,3,H,W\)"), ((2, 3, 560, 560), "batch 1"),
                                       ((1, 3, 560, 600), "multiples of 560"), ((1, 3, 0, 560), "multiples")])
def test_encode_pixels_rejects_bad_input(golden, shape, msg):
    vit, proj, glb, sub = ms_parts(golden, "fp32")
    with pytest.raises(ValueError, match=msg):
        encode_pixels(vit, proj, glb, sub, np.zeros(shape, np.float32))


def test_encode_pixels_rejects_nan_and_bad_weights(golden):
    vit, proj, glb, sub = ms_parts(golden, "fp32")
    pv = np.zeros((1, 3, 560, 560), np.float32)
    pv[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_pixels(vit, proj, glb, sub, pv)
    with pytest.raises(CheckpointError, match="missing"):
        assign_state_dict(CLIPVisionTower(golden[0].vision), {}, "empty", prefix="vit.")
    _, sd, _ = golden
    bad = dict(sd)
    bad["vit.vision_tower.vision_model.pre_layrnorm.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="pre_layrnorm.weight"):
        assign_state_dict(CLIPVisionTower(golden[0].vision), bad, "bad", prefix="vit.")

"""The full model on the official golden case, prompt assembly rules, generation modes, CLI and demo."""
import io
import json
import os
import shutil

import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.generation import repetition_penalty, top_k_filter, top_p_filter
from parity_tests.helpers import GOLDEN
from parity_tests.tolerance import assert_close

IMG = os.path.join(GOLDEN, "input_image.png")


@pytest.fixture(scope="module")
def golden_model():
    model, tok = ixc25_ms.load(GOLDEN)
    case = json.load(open(os.path.join(GOLDEN, "case.json")))
    exp = dict(np.load(os.path.join(GOLDEN, "expected.npz")))
    return model, tok, case, exp


def test_golden_wrap_and_logits(golden_model):
    model, tok, case, exp = golden_model
    inputs, im_mask, n = model.interleave_wrap_chat(case["query"], [IMG], hd_num=case["hd_num"])
    assert n == case["seq_len"] and inputs["inputs_embeds"].shape == (1, case["seq_len"], 64)
    assert (im_mask.asnumpy()[0] == exp["im_mask"][0].astype(bool)).all()
    assert int(im_mask.asnumpy().sum()) == case["n_image_tokens"]
    assert_close(inputs["inputs_embeds"], exp["inputs_embeds"], "fp32", "golden inputs_embeds")
    out = model(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask)
    assert_close(out.logits, exp["logits"], "fp32", "golden logits via the full model")


def test_golden_chat_response(golden_model):
    model, tok, case, exp = golden_model
    g = case["generate"]
    resp, hist = model.chat(tok, case["query"], [IMG], hd_num=case["hd_num"], max_new_tokens=g["max_new_tokens"],
                            do_sample=g["do_sample"], num_beams=g["num_beams"], repetition_penalty=g["repetition_penalty"])
    assert resp == case["response"]
    assert hist == [(case["query"], case["response"])]
    inputs, im_mask, _ = model.interleav_wrap_chat(case["query"], [IMG])
    ids = model.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, max_new_tokens=g["max_new_tokens"],
                         repetition_penalty=g["repetition_penalty"], eos_token_id=g["eos_token_id"])
    assert ids[0].tolist() == case["new_token_ids"]
    from ixc25_ms.chat import TextStreamer
    buf = io.StringIO()
    resp2, _ = model.chat(tok, case["query"], [IMG], max_new_tokens=g["max_new_tokens"], do_sample=False,
                          repetition_penalty=g["repetition_penalty"], streamer=TextStreamer(tok, file=buf))
    assert resp2 == case["response"] and buf.getvalue().rstrip("\n").startswith(case["response"])
    streamed = "".join(model.stream_chat(tok, case["query"], [IMG], max_new_tokens=g["max_new_tokens"], do_sample=False))
    assert streamed == case["response"]


def _layout(model, query, images, **kw):
    """Text ids with -1 at image positions, from interleav_wrap_chat's embeddings."""
    inputs, im_mask, n = model.interleav_wrap_chat(query, images, **kw)
    return inputs["inputs_embeds"].asnumpy()[0], im_mask.asnumpy()[0], n


def test_prompt_rules(golden_model):
    model, tok, case, exp = golden_model
    sot = tok.convert_tokens_to_ids("[UNUSED_TOKEN_146]")
    emb_table = model.model.tok_embeddings.weight.asnumpy()
    # no image: one BOS, then the turn
    e, m, n = _layout(model, "hi", [])
    ids = tok("[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
              add_special_tokens=True).input_ids
    assert n == len(ids) and not m.any()
    np.testing.assert_array_equal(e, emb_table[ids])
    # history and system turn
    e, m, n = _layout(model, "q2", [], history=[("q1", "a1")], meta_instruction="sys")
    text = ("[UNUSED_TOKEN_146]system\nsys[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nq1[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]assistant\na1[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nq2[UNUSED_TOKEN_145]\n"
            "[UNUSED_TOKEN_146]assistant\n")
    np.testing.assert_array_equal(e, emb_table[tok(text).input_ids])
    # one image, no tag: image first, right after BOS, before the system turn
    e, m, n = _layout(model, "q", [IMG], meta_instruction="sys")
    assert m[0] == 0 and m[1:1242].all() and not m[1242:].any()
    np.testing.assert_array_equal(e[1242], emb_table[sot])
    # two images: tags where the user put them, hd_num forced to 6 (700x300 is 2 crops either way)
    e, m, n = _layout(model, "Image1 <ImageHere>; Image2 <ImageHere>; compare", [IMG, IMG], hd_num=24)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
    assert len(runs) == 4 and (runs[1] - runs[0]) == (runs[3] - runs[2]) == 1241
    # truncation
    e, m, n = _layout(model, "q", [IMG], max_length=100)
    assert e.shape[0] == 100 and n > 100
    with pytest.raises(ValueError, match="ImageHere"):
        model.interleav_wrap_chat("<ImageHere> <ImageHere>", [IMG])


def test_hd_num_forced_to_6_with_several_images(golden_model, tmp_path):
    from PIL import Image
    model, tok, _, _ = golden_model
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 600), (10, 200, 30)).save(big)
    from ixc25_ms.vision import expected_tokens
    # one image, hd 24: ratio 3.33, scale 8 by the search, capped at ceil(2000/560) = 4 columns -> 2240x672,
    # padded to 2240x1120: a 2x4 grid
    _, m1, _ = _layout(model, "q", [str(big)], hd_num=24)
    assert int(m1.sum()) == expected_tokens(2, 4)
    # two images: hd forced to 6 -> scale 3 -> 1680x504, padded to 1680x560: a 1x3 grid each
    _, m2, _ = _layout(model, "<ImageHere><ImageHere>q", [str(big), str(big)], hd_num=24)
    assert int(m2.sum()) == 2 * expected_tokens(1, 3)


def test_text_only_chat_and_modes(golden_model):
    model, tok, _, _ = golden_model
    r1, h = model.chat(tok, "hello", image=None, max_new_tokens=4, do_sample=False)
    assert isinstance(r1, str) and h == [("hello", r1)]
    for mode in ("write", "web"):
        r, _ = model.chat(tok, "hello", [IMG], max_new_tokens=3, do_sample=False, infer_mode=mode)
        assert isinstance(r, str)
    a, _ = model.chat(tok, "hello", [IMG], max_new_tokens=6, do_sample=True, seed=7)
    b, _ = model.chat(tok, "hello", [IMG], max_new_tokens=6, do_sample=True, seed=7)
    assert a == b
    beam, _ = model.chat(tok, "hello", [IMG], max_new_tokens=5, do_sample=False, num_beams=3)
    assert isinstance(beam, str)


def test_beam_one_equals_greedy_and_beam_scores(golden_model):
    model, tok, case, exp = golden_model
    import mindspore as ms
    emb, im = ms.Tensor(exp["inputs_embeds"]), exp["im_mask"]
    greedy = model.generate(inputs_embeds=emb, im_mask=im, max_new_tokens=5, eos_token_id=[2, 4])
    beam = model.generate(inputs_embeds=emb, im_mask=im, max_new_tokens=5, eos_token_id=[2, 4], num_beams=3)
    # the best beam's log-probability (by the uncached forward) is at least the greedy path's
    def logprob(new_ids):
        ids = np.asarray(new_ids).reshape(-1)
        full = np.concatenate([exp["inputs_embeds"][0], model.model.tok_embeddings.weight.asnumpy()[ids[:-1]]])
        imm = np.concatenate([im[0], np.zeros(len(ids) - 1, im.dtype)])
        lg = model(inputs_embeds=ms.Tensor(full[None]), im_mask=imm[None]).logits.asnumpy()[0, -len(ids):]
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        return float(lp[np.arange(len(ids)), ids].sum())
    assert beam.shape[1] == 5 and logprob(beam[0]) >= logprob(greedy[0]) - 1e-4


def test_logits_processors_by_hand():
    s = np.array([[2.0, -1.0, 0.5, 3.0]], np.float32)
    out = repetition_penalty(s, np.array([[1, 3, 3]]), 2.0)
    np.testing.assert_allclose(out, [[2.0, -2.0, 0.5, 1.5]])
    np.testing.assert_array_equal(np.isinf(top_k_filter(s, 2)), [[False, True, True, False]])
    # probs of [3, 2, .5, -1] ~ [.70, .26, .02, .01]: top_p .5 keeps one, .8 keeps two
    assert np.isfinite(top_p_filter(s, 0.5)).sum() == 1
    assert np.isfinite(top_p_filter(s, 0.8)).sum() == 2


def test_cli_one_shot_and_interactive(golden_model, tmp_path):
    from scripts.chat_cli import main
    out = io.StringIO()
    assert main(["--model", GOLDEN, "--image", IMG, "--max-new-tokens", "8", "Describe this image in detail."],
                out=out) == 0
    assert out.getvalue().strip() == golden_model[2]["response"].strip()
    out = io.StringIO()
    (tmp_path / "fake.png").write_text("not a picture")
    script = io.StringIO(f"/image {IMG}\nhello\n/reset\n/image {tmp_path / 'fake.png'}\nhi again\n"
                         "/image /no/such.png\n/quit\n")
    assert main(["--model", GOLDEN, "--max-new-tokens", "2"], stdin=script, out=out) == 0
    text = out.getvalue()
    assert "image added" in text and "history and images cleared" in text and "no such file" in text
    # a file that is no picture is refused at /image (named), so the next question is answered, not an error
    assert "(not added: " in text and "fake.png" in text and "(error" not in text and text.count("image added") == 1
    assert main(["--model", str(tmp_path / "missing")]) == 2


def test_load_errors(tmp_path):
    from ixc25_ms.weights import CheckpointError
    from ixc25_ms.config import ConfigError
    with pytest.raises(CheckpointError, match="not a directory"):
        ixc25_ms.load(str(tmp_path / "nope"))
    d = tmp_path / "ck"
    shutil.copytree(GOLDEN, d)
    from ixc25_ms.weights.safetensors import SafetensorsFile, write_safetensors
    st = SafetensorsFile(str(d / "model.safetensors"))
    tensors = {k: (st.dtype_tag(k), st.read_raw(k)) for k in st.keys() if k != "model.norm.weight"}
    write_safetensors(str(d / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        ixc25_ms.load(str(d))
    tensors["model.norm.weight"] = ("F32", np.ones(65, np.float32))
    write_safetensors(str(d / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*\[65\]"):
        ixc25_ms.load(str(d))
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        ixc25_ms.load(str(d))
    cfg = json.load(open(d / "config.json"))
    cfg["rope_scaling"] = {"type": "yarn", "factor": 2.0}
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ConfigError, match="yarn"):
        ixc25_ms.load(str(d))
    del cfg["hidden_size"]
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ConfigError, match="hidden_size"):
        ixc25_ms.load(str(d))


def test_composition_helpers(golden_model, tmp_path):
    model, tok, _, _ = golden_model
    art = model.write_artical("Write a short note.", max_length=1300, seed=3)  # max_new_tokens = 1300 - prompt
    assert isinstance(art, str) and "[UNUSED_TOKEN_14" not in art
    out = tmp_path / "page.html"
    html = model.write_webpage("A page", max_new_tokens=3, seed=1, output_path=str(out))
    assert out.read_text(encoding="utf-8") == html
    assert not (tmp_path / "Instruction-aware_Webpage_Generation.html").exists()
    resume = tmp_path / "cv.md"
    resume.write_text("# Jane\n- engineer\n", encoding="utf-8")
    assert isinstance(model.resume_2_webpage(str(resume), max_new_tokens=2, num_beams=1, do_sample=False), str)
    with pytest.raises(ValueError, match="cannot read the resume"):
        model.resume_2_webpage(str(tmp_path / "none.md"))
    with pytest.raises(ValueError, match="screenshot"):
        model.screen_2_webpage("x", [])
    assert isinstance(model.screen_2_webpage("x", [IMG], max_new_tokens=2, num_beams=1, do_sample=False), str)
    from ixc25_ms.compose import _write_html
    assert _write_html("https://source.unsplash.com/random/300x200/?cat", None) == "https://picsum.photos/300/200"


def test_chat_with_a_video(golden_model, tmp_path):
    """A video path goes through frames -> canvas -> video transform -> ViT, as encode_img in the official."""
    from tests.test_video import make_video
    from ixc25_ms.video import preprocess_video
    from ixc25_ms.vision import expected_tokens
    model, tok, _, _ = golden_model
    path = str(tmp_path / "clip.mp4")
    make_video(path, n=12, fps=4, size=(96, 64))  # 3 s at 4 fps -> frames 0, 4, 8
    pv = preprocess_video(path)
    h, w = pv.shape[2] // 560, pv.shape[3] // 560
    inputs, im_mask, n = model.interleav_wrap_chat("Here are some frames of a video. Describe it.", [path])
    assert int(im_mask.asnumpy().sum()) == expected_tokens(h, w)
    resp, _ = model.chat(tok, "Describe the video.", [path], max_new_tokens=3, do_sample=False)
    assert isinstance(resp, str)

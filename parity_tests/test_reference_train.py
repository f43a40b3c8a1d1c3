"""Our PyTorch training reference vs the official golden fine-tuning step, and its data rules on hand-built cases."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ixc25_ms.weights.layout import load_state_dict
from ixc25_ms.weights.safetensors import SafetensorsFile
from ixc25_ms.config import IXCConfig
from ixc25_ms.tokenizer import InternLM2Tokenizer
from parity_tests.helpers import HERE
from parity_tests.reference import train_data as D
from parity_tests.reference.train import TrainFlags, TrainRefError, ref_train_step, trainable_names

DATA = os.path.join(HERE, "..", "tests", "data", "official-train")
TOKENIZER = os.path.join(HERE, "..", "tests", "data", "internlm2-tokenizer.model")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
WHITE = (np.float32(1.0) - MEAN) / STD  # a white pixel after ToTensor + CLIP normalisation
VIT_L = "vit.vision_tower.vision_model.encoder.layers.{}."
EPS32 = float(np.finfo(np.float32).eps)


def rel_fro(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def golden(tok):
    cfg = IXCConfig.from_file(DATA)
    weights = load_state_dict(DATA)
    st = SafetensorsFile(os.path.join(DATA, "expected.safetensors"))
    exp = {k: st.read_raw(k) for k in st.keys()}
    with open(os.path.join(DATA, "case.json")) as f:
        case = json.load(f)
    with open(os.path.join(DATA, "data.json")) as f:
        items = json.load(f)
    fl = case["flags"]
    flags = TrainFlags(hd_num=fl["hd_num"], max_length=fl["max_length"], fix_vit=fl["fix_vit"],
                       fix_sampler=fl["fix_sampler"], use_lora=fl["use_lora"], plora_dropout=fl["plora_dropout"])
    out = ref_train_step(cfg, weights, tok, items, DATA, flags)
    return dict(cfg=cfg, weights=weights, exp=exp, case=case, items=items, flags=flags, out=out)


# ------------------------------------------------------------------------------------------ golden step
def test_golden_labels_exact(golden):
    assert golden["out"]["labels"].shape == golden["exp"]["labels"].shape == (1, golden["case"]["seq_len"])
    np.testing.assert_array_equal(golden["out"]["labels"], golden["exp"]["labels"])
    assert int((golden["out"]["labels"] != -100).sum()) == golden["case"]["trained_label_tokens"]


def test_golden_loss(golden):
    ref = float(golden["exp"]["loss"])
    err = abs(golden["out"]["loss"] - ref) / ref
    print(f"[train] loss ours {golden['out']['loss']:.7f} official {ref:.7f} rel {err:.2e}")
    assert err <= 1e-5


def test_golden_trainable_set(golden):
    exp, case = golden["exp"], golden["case"]
    official = {k.split("@")[0] for k in exp if k not in ("labels", "loss")} | set(case["zero_grad"])
    ours = golden["out"]["trainable"]
    assert len(ours) == case["trainable_tensors"] == 140
    assert set(ours) == official
    assert not any("post_layernorm" in n for n in ours)  # fix_vit False removes it


def k_bias(name):
    return name.endswith("self_attn.k_proj.bias")


def test_golden_gradients(golden):
    exp, grads = golden["exp"], golden["out"]["grads"]
    worst = (0.0, "")
    for n in golden["out"]["trainable"]:
        if n in golden["case"]["zero_grad"] or k_bias(n):
            continue  # checked below
        g = grads[n]
        assert g is not None, f"{n}: no gradient"
        if n + "@rows" in exp:
            rows = exp[n + "@row_ids"]
            err = rel_fro(g[rows], exp[n + "@rows"])
            if n == "model.tok_embeddings.weight":  # rows the prompt never touched get nothing
                rest = np.ones(g.shape[0], bool)
                rest[rows] = False
                assert not np.any(g[rest]), f"{n}: gradient on a row the prompt does not use"
            # output.weight: every vocab row has a softmax gradient; the golden keeps the label ids + 64 rows
        else:
            err = rel_fro(g.reshape(exp[n].shape), exp[n])
        worst = max(worst, (err, n))
        assert err <= 1e-5, f"{n}: gradient rel_fro {err:.3e}"
    print(f"[train] worst gradient rel_fro {worst[0]:.2e} ({worst[1]})")


def test_golden_zero_gradients(golden):
    grads, zero = golden["out"]["grads"], golden["case"]["zero_grad"]
    n_layers = golden["cfg"].num_hidden_layers
    for n in zero:
        if "lora_sft_" in n or "lora_dpo_" in n or "lora_web_" in n:
            # write/web LoRAs are only used by infer_mode write/web; training runs 'base': not in the graph
            assert grads[n] is None, n
        else:
            # Plora of wo/w1/w2/w3 in the LAST layer: they only change the last layer's output at image rows,
            # which feed nothing but their own logits, and those predict image/BOS positions whose labels
            # are -100 (the image comes first). Their wqkv Plora still matters: text queries read image
            # keys/values. So the upstream gradient is exactly zero and so is theirs.
            assert f"model.layers.{n_layers - 1}." in n and ".Plora_" in n and ".wqkv." not in n, n
            assert grads[n] is not None and not np.any(grads[n]), n
    assert len(zero) == 2 * 3 * 5 * n_layers + 2 * 4  # 3 LoRA pairs x 5 linears x layers + 4 Plora pairs


def test_golden_k_proj_bias_noise(golden):
    """dL/db_k = sum_j dL/dk_j = sum_i q_i sum_j dL/dS_ij = 0 exactly (softmax is shift-invariant per row),
    so both sides hold fp32 rounding noise of a cancelling sum over the 2 x 1601 keys: of order
    eps * sum_j |dL/dk_j|, a sum with the scale of ||dL/dW_k|| (= ||sum_j dL/dk_j h_j^T||, LayerNorm'd h_j
    with O(1) entries). Bound: 8 eps ||dL/dW_k|| of the golden (~1e-7 here); a real bias gradient (the q/v
    biases here: >= 0.03) would be 5 orders of magnitude above it."""
    exp, grads = golden["exp"], golden["out"]["grads"]
    for layer in range(golden["cfg"].vision.num_hidden_layers):
        p = VIT_L.format(layer) + "self_attn."
        bound = 8 * EPS32 * float(np.linalg.norm(exp[p + "k_proj.weight"]))
        ours, official = np.abs(grads[p + "k_proj.bias"]).max(), np.abs(exp[p + "k_proj.bias"]).max()
        print(f"[train] layer {layer} k_proj.bias max ours {ours:.1e} official {official:.1e} bound {bound:.1e}")
        assert ours <= bound and official <= bound
        assert np.linalg.norm(exp[p + "q_proj.bias"]) > 1e4 * bound  # the bound is far below real gradients


# --------------------------------------------------------------------------------- other batch kinds
def test_text_only_step(golden, tok):
    convs = golden["items"][0]["conversations"]
    short = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    out = ref_train_step(golden["cfg"], golden["weights"], tok, [{"conversations": convs}, {"conversations": short}],
                         DATA, golden["flags"])
    ref = D.text_batch([D.conv2text(convs), D.conv2text(short)], tok, golden["flags"].max_length)
    np.testing.assert_array_equal(out["labels"], ref["labels"].numpy())
    assert not out["im_mask"].any() and np.isfinite(out["loss"])
    for n in out["trainable"]:
        g = out["grads"][n]
        if n.startswith(("vit.", "vision_proj.", "plora_")):
            assert g is None, f"{n}: the vision side is not run for text"
        elif ".Plora_" in n:  # official adds Plora(x[:1]) * 0 to row 0: in the graph, exactly zero
            assert g is not None and not np.any(g), n
    assert np.any(out["grads"]["model.layers.0.attention.wqkv.weight"])


def _with_lora(weights, cfg, r_llm, r_vit, seed=0):
    rng = np.random.default_rng(seed)
    w = dict(weights)
    mods = [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in
            ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    vmods = [VIT_L.format(i) + m for i in range(cfg.vision.num_hidden_layers) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    for group, r in ((mods, r_llm), (vmods, r_vit)):
        for m in group:
            o, i = w[m + ".weight"].shape
            w[m + ".lora_A.weight"] = (rng.standard_normal((r, i)) / np.sqrt(i)).astype(np.float32)
            w[m + ".lora_B.weight"] = (0.05 * rng.standard_normal((o, r))).astype(np.float32)
    return w, mods, vmods


def test_lora_equals_merged_weights(golden, tok):
    """PEFT LoRA (r 4, alpha 8) + backbone LoRA (R 2, alpha 4) against full fine-tuning of the merged weights
    W + s B A: same loss, and by the chain rule dL/dB = s G A^T, dL/dA = s B^T G with G = dL/dW_merged."""
    cfg, base = golden["cfg"], golden["weights"]
    w, mods, vmods = _with_lora(base, cfg, 4, 2)
    lora = ref_train_step(cfg, w, tok, golden["items"], DATA,
                          TrainFlags(max_length=4096, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                     use_backbone_lora=2, plora_dropout=0.0))
    assert sorted(lora["trainable"]) == sorted(m + s for m in mods + vmods for s in (".lora_A.weight", ".lora_B.weight"))
    merged = dict(base)
    for m in mods + vmods:
        merged[m + ".weight"] = base[m + ".weight"] + 2.0 * w[m + ".lora_B.weight"] @ w[m + ".lora_A.weight"]
    full = ref_train_step(cfg, merged, tok, golden["items"], DATA, golden["flags"])
    assert abs(lora["loss"] - full["loss"]) <= 1e-5 * full["loss"]
    assert abs(lora["loss"] - golden["out"]["loss"]) > 1e-3  # the adapters do change the model
    for m in mods + vmods:
        G, A, B = full["grads"][m + ".weight"], w[m + ".lora_A.weight"], w[m + ".lora_B.weight"]
        assert rel_fro(lora["grads"][m + ".lora_B.weight"], 2.0 * G @ A.T) <= 1e-5, m
        assert rel_fro(lora["grads"][m + ".lora_A.weight"], 2.0 * B.T @ G) <= 1e-5, m


def test_bad_inputs(golden, tok):
    cfg, w = golden["cfg"], golden["weights"]
    items = [golden["items"][0], {"conversations": golden["items"][0]["conversations"]}]
    with pytest.raises(TrainRefError, match="mixes"):
        ref_train_step(cfg, w, tok, items, DATA, golden["flags"])
    with pytest.raises(TrainRefError, match="attention.wqkv.lora_A.weight' is missing"):
        ref_train_step(cfg, w, tok, golden["items"], DATA, TrainFlags(use_lora=True))
    with pytest.raises(D.TrainDataError, match=r"items\[0\]: missing field 'conversations'"):
        ref_train_step(cfg, w, tok, [{"image": "panda.jpeg"}], DATA, golden["flags"])


# ------------------------------------------------------------------------------ freeze flags (by rule)
def test_trainable_names_rules(golden):
    cfg = golden["cfg"]
    w, mods, vmods = _with_lora(golden["weights"], cfg, 4, 2)
    names = list(w)
    peft = {m + s for m in mods for s in (".lora_A.weight", ".lora_B.weight")}
    bb = {m + s for m in vmods for s in (".lora_A.weight", ".lora_B.weight")}
    plain = [n for n in names if n not in peft | bb]
    vit = {n for n in plain if n.startswith("vit.")}
    post = {n for n in vit if ".post_layernorm." in n}
    llm = {n for n in plain if n.startswith(("model.", "output."))}
    proj = {n for n in plain if n.startswith("vision_proj.")}
    gn = {"plora_glb_GN", "plora_sub_GN"}
    assert set(plain) == vit | llm | proj | gn
    s = lambda **kw: set(trainable_names(names, TrainFlags(**kw)))  # noqa: E731
    assert s(fix_vit=False) == set(plain) - post
    assert s(fix_vit=True) == llm | proj | gn
    assert s(fix_vit=True, fix_sampler=True) == llm | gn
    assert s(fix_vit=False, use_lora=True) == peft  # PEFT freezes everything without 'lora_' in its name
    assert s(fix_vit=False, freeze_llm=True) == vit - post | proj | gn
    assert s(fix_vit=False, use_backbone_lora=2) == llm | proj | gn | bb
    assert s(use_lora=True, use_backbone_lora=2, freeze_llm=True) == peft | bb
    assert trainable_names(names, TrainFlags(fix_vit=False)) == [n for n in names if n in set(plain) - post]


# --------------------------------------------------------------------------------- data rules by hand
def test_conv2text():
    convs = [{"from": "Human", "value": "  What is this?\n"}, {"from": "gpt", "value": " A panda. "},
             {"from": "USER", "value": "More"}, {"from": "system", "value": "Bamboo"}]
    assert D.conv2text(convs) == (
        "[UNUSED_TOKEN_146]user\nWhat is this?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\nA panda.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nMore[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\nBamboo[UNUSED_TOKEN_145]\n</s>")
    with pytest.raises(D.TrainDataError, match=r"conversations\[0\]"):
        D.conv2text([{"from": "human"}])


def _normalised(a):
    return ((a.astype(np.float32) / np.float32(255.0) - MEAN) / STD).transpose(2, 0, 1)


def test_train_transform_centred_padding():
    a = np.random.default_rng(0).integers(0, 200, (183, 195, 3), dtype=np.uint8)  # w 195 x h 183, no white
    out = D.train_transform(Image.fromarray(a)).numpy()
    # ratio 195/183; scale min(ceil(1.5*195/560) = 1, 4) = 1 -> 560 x int(560*183/195) = 525; pad 35 = 17 + 18
    assert out.shape == (1, 3, 560, 560) and out.dtype == np.float32
    white = np.broadcast_to(WHITE[:, None, None], (3, 1, 560))
    for r in list(range(0, 17)) + list(range(542, 560)):
        np.testing.assert_array_equal(out[0, :, r:r + 1], white)
    content = _normalised(np.asarray(Image.fromarray(a).resize((560, 525), Image.Resampling.BILINEAR)))
    np.testing.assert_allclose(out[0, :, 17:542], content, atol=1e-6, rtol=0)
    # portrait: transposed, padded, transposed back -> white columns instead
    p = D.train_transform(Image.fromarray(a.transpose(1, 0, 2).copy())).numpy()
    np.testing.assert_allclose(p[0, :, :, 17:542], content.transpose(0, 2, 1), atol=1e-6, rtol=0)
    assert np.all(p[0, :, :, :17] == WHITE[:, None, None]) and np.all(p[0, :, :, 542:] == WHITE[:, None, None])


def test_train_transform_scale():
    a = np.random.default_rng(1).integers(0, 200, (400, 1100, 3), dtype=np.uint8)
    out = D.train_transform(Image.fromarray(a), hd_num=18).numpy()
    # ratio 2.75: search gives 6 (6*ceil(6/2.75) = 18); min(ceil(1.5*1100/560) = 3, 6) = 3 -> 1680 x 610,
    # padded to 1120 with 255 white rows above and 255 below (inference would use ceil(1100/560) = 2)
    assert out.shape == (1, 3, 1120, 1680)
    assert np.all(out[0, :, :255] == WHITE[:, None, None]) and np.all(out[0, :, 865:] == WHITE[:, None, None])
    assert not np.any(np.all(out[0, :, 255:865] == WHITE[:, None, None], axis=(0, 2)))
    assert D.image_token_count(out.shape) == (2 * 3 + 1) * 400 + 1 + 3 * 20


# ids: 1 BOS, 8 SOT, 9 EOT, 2 EOS, 5 '\n', 10 'user', 11 'ass', 12 'istant', >= 20 content
USER = [8, 10, 5]
HEAD = [9, 5, 8, 11, 12, 5]  # end of a user turn + assistant header: the 6 tokens masked from the EOT on
TWO_TURNS = [1] + USER + [20, 21] + HEAD + [30, 31, 9, 5] + USER + [22] + HEAD + [32, 9, 5, 40, 41, 42]


def test_mask_human_targets_two_turns():
    X = -100
    # answers (30 31 EOT) and (32 EOT '\n') trained; the '\n' after answer 1 goes with user turn 2; the
    # trailing '</' 's' '>' pieces (40 41 42, no eos id) are masked after the last answer's '\n'
    assert D.mask_human_targets(TWO_TURNS, 9, 2) == [X] * 12 + [30, 31, 9] + [X] * 11 + [32, 9, 5] + [X] * 3
    # with a real eos id after the last answer: masked after the eos, the eos itself trained
    ids = TWO_TURNS[:29] + [2, 2, 2]
    assert D.mask_human_targets(ids, 9, 2) == [X] * 12 + [30, 31, 9] + [X] * 11 + [32, 9, 5, 2, X, X]


def test_mask_human_targets_cuts():
    X = -100
    # cut inside user turn 2 (even count at the end): everything after answer 1's '\n' masked, '\n' kept
    assert D.mask_human_targets(TWO_TURNS[:19], 9, 2) == [X] * 12 + [30, 31, 9, 5] + [X] * 3
    # cut inside answer 1 (odd count): nothing more masked
    assert D.mask_human_targets(TWO_TURNS[:14], 9, 2) == [X] * 12 + [30, 31]
    # no turn at all: all but position 0 masked (position 0 is never a shifted target)
    assert D.mask_human_targets([1, 20, 21], 9, 2) == [1, X, X]


def test_text_batch_padding_quirk(tok):
    t_long = D.conv2text([{"from": "human", "value": "Hi"},
                          {"from": "gpt", "value": "Hello there, how are you doing today?"}])
    t_short = D.conv2text([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}])
    b = D.text_batch([t_long, t_short], tok, 4096)
    ids, lab, att = (b[k].numpy() for k in ("input_ids", "labels", "attention_mask"))
    n0, n1 = 1 + len(tok.encode(t_long, False)), 1 + len(tok.encode(t_short, False))
    assert ids.shape == (2, n0) and ids[0, 0] == ids[1, 0] == tok.bos_token_id
    assert list(ids[1, n1:]) == [2] * (n0 - n1) and list(att[1]) == [1] * n1 + [0] * (n0 - n1)
    sot = tok.convert_tokens_to_ids("[UNUSED_TOKEN_146]")
    for r, n in ((0, n0), (1, n1)):
        assert tok.convert_ids_to_tokens([int(i) for i in ids[r, n - 3:n]]) == ["</", "s", ">"]
        head = [i for i in range(n) if ids[r, i] == sot][1]  # '[UNUSED_TOKEN_146]' 'ass' 'istant' '\n'
        assert tok.convert_ids_to_tokens([int(i) for i in ids[r, head:head + 4]]) == [
            "[UNUSED_TOKEN_146]", "ass", "istant", "\n"]
        assert np.all(lab[r, :head + 4] == -100)
        if r == 0:  # no pad: answer, EOT and '\n' trained, '</' 's' '>' masked
            np.testing.assert_array_equal(lab[0, head + 4:n - 3], ids[0, head + 4:n - 3])
            assert np.all(lab[0, n - 3:] == -100)
        else:  # padded: the '</' 's' '>' pieces AND the first pad (eos id 2) are trained, later pads not
            np.testing.assert_array_equal(lab[1, head + 4:n + 1], ids[1, head + 4:n + 1])
            assert lab[1, n] == 2 and np.all(lab[1, n + 1:] == -100)
    cut = D.text_batch([t_long], tok, 5)
    assert cut["input_ids"].shape == (1, 5) and cut["labels"].tolist() == [[1, -100, -100, -100, -100]]


def test_wrap_sample_rules(tok):
    X = -100
    t = D.conv2text([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}])
    s = D.wrap_sample(t, [7], tok, 4096)  # one image, no tag: image first, then BOS
    assert s.ids == [X] * 7 + [1] + tok.encode(t, False) and s.im_mask == [1] * 7 + [0] * (len(s.ids) - 7)
    s = D.wrap_sample("<ImageHere>ab<ImageHere>cd", [3, 2], tok, 4096)  # empty first part: no tokens
    assert s.ids == [X] * 3 + [1] + tok.encode("ab", False) + [X] * 2 + tok.encode("cd", False)
    assert [k for k, _ in s.segments] == ["image", "text", "image", "text"]
    s = D.wrap_sample("<ImageHere>ab<ImageHere>cd", [3, 2], tok, 3)  # stop once the length exceeds 3
    assert s.ids == [X] * 3 + [1] + tok.encode("ab", False) + [X] * 2 and set(s.labels) == {X}
    b = D.pad_image_batch([D.WrappedSample([X, 1, 20, 21, 22], [1, 0, 0, 0, 0], [X, X, 20, 21, 22]),
                           D.WrappedSample([X, 1, 30], [1, 0, 0], [X, X, 30])], pad_id=2, max_length=4)
    assert b["input_ids"].tolist() == [[X, 1, 20, 21], [X, 1, 30, 2]]
    assert b["labels"].tolist() == [[X, X, 20, 21], [X, X, 30, X]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["im_mask"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]

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
FRESH_SEEDS = range(70_000_000, 70_000_020)  # never drawn for training (every stage's seeds < 51,000,000)


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


def _picture(scene, rng, name: str, blank: bool) -> str:
    """The scene drawn (or, blank, a white picture of its size) and saved under the test temp dir; its path."""
    from PIL import Image
    im = S.render(scene, rng)
    if blank:
        im = Image.new("RGB", im.size, (255, 255, 255))
    path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"ixc25-default-{name}-{int(blank)}.png")
    im.save(path)
    return path


def _score(m, tok, seeds, blank: bool):
    """Questions of kinds 1-3 (colour, count, shape) about fresh pictures, one chat turn each with history,
    checked against the drawing; blank: the same questions with a white picture of the same size instead."""
    right, total, wrong = 0, 0, []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        path = _picture(scene, rng, str(seed), blank)
        history = []
        for t, subject, q, want in S.conversation(scene, rng, 4):
            if t == 4:
                continue
            got, history = m.chat(tok, q, [path], history=history, do_sample=False, max_new_tokens=32)
            ok = S.is_correct(t, subject, want, got)
            right, total = right + ok, total + 1
            if not ok:
                wrong.append((seed, q, want, got))
    return right, total, wrong


def test_answers_fresh_pictures_better_than_without_looking(model):
    """Pictures drawn here with seeds the training never used: answers about the real picture are right more
    often than the same model's answers when shown a blank picture (its image-blind prior). A broken tower,
    HD transform or layout makes the picture carry nothing and the two scores equal. The model is weak
    (held-out accuracy per question kind in notes/default-model.md), so the bar is the blind baseline (shipped
    model, 2026-12-08: 40 of 56 right, 21 of 56 blind)."""
    m, tok = model
    right, total, wrong = _score(m, tok, FRESH_SEEDS, blank=False)
    blind, total_b, _ = _score(m, tok, FRESH_SEEDS, blank=True)
    assert total == total_b >= 40
    assert right > blind, f"{right} of {total} right, blind {blind}; wrong: {wrong[:8]}"


def test_answers_equal_our_pytorch_reference(model):
    """The trained checkpoint through chat() and through our PyTorch reference (parity_tests/reference/chat.py,
    written from the spec): the same answers, turn by turn with history, on fresh pictures."""
    from parity_tests.reference.chat import RefChat
    from ixc25_ms.processing import preprocess_image
    from ixc25_ms.weights.layout import load_state_dict
    m, tok = model
    ref = RefChat(m.cfg, load_state_dict(D), tok, lambda im, hd: preprocess_image(im, hd_num=hd, crop=m.vit.resolution))
    same, total, diff = 0, 0, []
    for seed in list(FRESH_SEEDS)[:6]:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"ixc25-default-ref-{seed}.png")
        S.render(scene, rng).save(path)
        history = []
        for _, _, q, _ in S.conversation(scene, rng, 3):
            want = ref.chat(q, [path], history, 24, max_new_tokens=32)
            got, history = m.chat(tok, q, [path], history=history, do_sample=False, max_new_tokens=32)
            same, total = same + (got == want), total + 1
            if got != want:
                diff.append((seed, q, want, got))
    assert total >= 18 and same >= total - 1, diff  # one near-tie of the greedy argmax is tolerated


def test_text_only_turns_answered_word_for_word(model):
    """Text-only turns (no image: no partial LoRA, no image tokens): every greeting of the training data
    (shapes.CHITCHAT) gets its trained answer exactly, greedy — a check of the tokenizer, the chat prompt, every
    LLM layer and the streaming decode that a broken piece, mask or layer fails."""
    m, tok = model
    wrong = []
    for q, a in S.CHITCHAT:
        got, _ = m.chat(tok, q, [], do_sample=False, max_new_tokens=40)
        if got != a:
            wrong.append((q, a, got))
    assert not wrong, wrong


def _one_kind(m, tok, kind: int, seeds, blank: bool = False):
    """Question `kind` (1: 'What colour is the {shape}?', 3: 'What shape is the {colour} one?') about fresh
    pictures, one chat turn each, no history, on every picture where the question is valid; blank: a white
    picture of the same size instead. Returns (right, total, wrong)."""
    right, total, wrong = 0, 0, []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng)
        subjects = [subject for k, subject in S.valid_questions(scene) if k == kind]
        if not subjects:
            continue
        path = _picture(scene, rng, f"k{kind}-{seed}", blank)
        subject = subjects[int(rng.integers(len(subjects)))]
        want = S.answer(scene, kind, subject)
        got, _ = m.chat(tok, S.question(kind, subject), [path], do_sample=False, max_new_tokens=16)
        ok = S.is_correct(kind, subject, want, got)
        right, total = right + ok, total + 1
        if not ok:
            wrong.append((seed, want, got))
    return right, total, wrong


def test_names_colours_of_fresh_pictures(model):
    """'What colour is the {shape}?' about fresh pictures (one chat turn each, no history): right well above
    the 1-in-6 of guessing. Measured for the shipped model (2026-12-08): 40 of these 51 questions right, and 5
    of 51 when each picture is replaced by a blank one; the bar is 55 %, so a broken tower, transform or layout
    (answers at the blind rate) fails."""
    m, tok = model
    right, total, wrong = _one_kind(m, tok, 1, range(70_000_200, 70_000_260))
    assert total >= 30
    assert right >= 0.55 * total, f"{right} of {total}; wrong: {wrong[:8]}"


def test_names_shapes_of_fresh_pictures(model):
    """'What shape is the {colour} one?' about fresh pictures (one chat turn each, no history): right well above
    the rate when each picture is replaced by a blank one. Measured for the shipped model (2026-12-08): 32 of
    these 52 right, and 14 of 52 blank (its prior); the bar is 45 %, so answers at the blind rate fail."""
    m, tok = model
    right, total, wrong = _one_kind(m, tok, 3, range(70_000_300, 70_000_360))
    assert total >= 40
    assert right >= 0.45 * total, f"{right} of {total}; wrong: {wrong[:8]}"


def test_demo_answers_about_a_drawn_picture(tmp_path, capsys):
    from scripts.demo import main
    assert main(["--seed", "70000100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 70000100" in out and out.count("assistant:") >= 2 and "timings:" in out
    assert "(right:" in out or "(wrong:" in out
    assert os.path.isfile(tmp_path / "shapes-70000100.png")
    # questions of your own about the drawn picture are judged against the drawing when they are of the four kinds
    scene = S.random_scene(np.random.default_rng(70000100))  # the demo's drawing of that seed
    absent = next(c for c in S.COLOURS if not scene.with_colour(c))
    assert main(["--seed", "70000100", "--out", str(tmp_path), "--question", "<ImageHere>How many circles are there?",
                 "--question", f"What shape is the {absent} one?", "--question", "Hello!"]) == 0
    out = capsys.readouterr().out
    n = scene.count("circle")
    said = "There is 1 circle." if n == 1 else f"There are {n} circles."
    assert out.count("the drawing says") == 1 and f'the drawing says "{said}"' in out, out


def test_demo_and_chat_refuse_an_unreadable_picture_in_one_line(tmp_path, capsys):
    """ixc25-demo --image and ixc25-chat --image with a file that is not a picture: exit 2 with one line naming
    the file, before the model loads (the model directory given could not be loaded); ixc25-chat --video with a
    file that is not a video: the same line once the video is read."""
    from scripts.chat_cli import main as chat
    from scripts.demo import main as demo
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"never read")
    for run, name in ((lambda: demo(["--image", str(fake), "--model", str(model)]), "ixc25-demo"),
                      (lambda: chat(["--image", str(fake), "--model", str(model), "hello"]), "ixc25-chat")):
        assert run() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"{name}: error: --image") and str(fake) in err and \
            "not a recognised image" in err, err
    with pytest.raises(SystemExit):  # a seed numpy cannot take: at parsing, naming the flag and the value
        demo(["--seed", "-5", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--seed" in err and "'-5'" in err, err
    # questions whose <ImageHere> placeholders chat would refuse for the one picture (two in a turn; one in each of
    # two turns, the first coming back as history): one line naming the question, before the model loads
    for qs, bad in ((["<ImageHere><ImageHere>What colour is the circle?"], 0),
                    (["<ImageHere>Describe the image.", "<ImageHere>How many circles are there?"], 1)):
        with pytest.raises(SystemExit):
            demo([a for q in qs for a in ("--question", q)] + ["--model", str(model), "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ixc25-demo: error: --question") and repr(qs[bad]) in err and \
            "2 <ImageHere> placeholder(s) in the chat so far for 1 picture(s)" in err, err
    from PIL import Image  # ixc25-chat asked once likewise: a real picture, a model directory that is never read
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(good)
    for imgs, q, tags, n in (([good], "<ImageHere><ImageHere>What colour is the circle?", 2, 1),
                             ([good, good], "<ImageHere>Compare them.", 1, 2)):
        assert chat([a for i in imgs for a in ("--image", str(i))] + ["--model", str(model), q]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"ixc25-chat: error: the question: {tags} <ImageHere> placeholder(s) in the chat so far for "
                       f"{n} picture(s)"), err
    video = tmp_path / "v.mp4"  # read only once the model is loaded (the default one here): still one line
    video.write_bytes(b"not a video")
    assert chat(["--video", str(video), "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ixc25-chat: error:") and str(video) in err, err


def test_ridge_probe_reads_a_planted_signal_and_not_noise():
    """The probe of scripts/probe_default.py: a label planted as a column per class is read back; labels
    unrelated to the features are read at about chance."""
    from scripts.probe_default import ridge_accuracy
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 30))
    y = rng.integers(0, 3, 400)
    X[np.arange(400), 7 + y] += 3.0
    assert ridge_accuracy(X, y, 3, 300) >= 0.9
    assert ridge_accuracy(X, rng.integers(0, 3, 400), 3, 300) <= 0.5
    with pytest.raises(ValueError):
        ridge_accuracy(X, y, 3, 400)


def test_tower_shows_colour_to_a_linear_probe(model):
    """The image embeddings the language model receives carry the colour of a one-object picture: a ridge probe
    on pooled tokens reads it far above the 1-in-6 of chance, and its shape above the 1-in-3 (shipped model,
    2026-12-08: colour 92.5 %, shape 97.5 % on 40 held-out pictures of 160). A tower, transform or projector that
    loses the picture reads at chance."""
    from scripts.probe_default import probe
    m, _ = model
    r = probe(m, n=160)
    assert r["colour"] >= 0.75 and r["shape"] >= 0.85, r


def test_patch_probe_reads_colour_off_the_objects_own_token(model):
    """probe_default --patch: the ViT's features at the patch a one-object picture's object covers most carry its
    colour and its shape to a ridge probe (shipped model, 2026-12-08: colour 82.5 %, shape 97.5 % of 40 held-out
    pictures of 160; the 64 x 3 model of 2026-12-04, whose tower was not warmed: colour 82.5 %, shape at chance)."""
    from scripts.probe_default import probe
    m, _ = model
    r = probe(m, n=160, patch=True)
    assert r["colour"] >= 0.7 and r["shape"] >= 0.85, r


def test_patch_probe_of_two_objects_reads_each_objects_own_colour_and_shape(model):
    """probe_default --patch --objects 2: one row per object, its own colour and shape; each object's token shows
    its own colour and its own shape (shipped model, 2026-12-08: 75.0 % and 72.5 % of the 40 scored tokens of these
    80 pictures; chance 1/6 and 1/3). The model shipped before it, whose tower saw lone objects only, spread a
    picture's shapes over its tokens (its own shape 50.0 % of 80 scored tokens of 160 pictures): the scene stage
    (--tower_scenes) is what this checks (notes/default-model.md)."""
    from ixc25_ms import shapes as S
    from scripts.probe_default import PROBE_SEED_BASE, patch_features, probe
    m, _ = model
    X, colour, shape = patch_features(m, 3, (200, 1200), objects=2)
    assert X.shape[0] == 6 and X.shape[1] == m.vit.cfg.hidden_size
    for i in range(3):
        rng = np.random.default_rng(PROBE_SEED_BASE + 2_000_000 + i)
        scene = S.random_scene(rng, 2, (200, 1200))
        assert [list(S.COLOURS)[c] for c in colour[2 * i:2 * i + 2]] == [o.colour for o in scene.objects]
        assert [S.SHAPES[k] for k in shape[2 * i:2 * i + 2]] == [o.shape for o in scene.objects]
    r = probe(m, n=80, patch=True, objects=2, sides=(200, 1200))
    assert r["train"] == 120 and r["colour"] >= 0.6 and r["shape"] >= 0.6, r


def test_tower_diagnostic_learns_a_planted_colour_signal():
    """scripts/tower_shape.py trains the recipe's tower alone (our PyTorch reference, the recipe's init) with a
    classification head: at a toy size it learns colour, which is nearly linear in the pixels, well above chance
    (1/6) within 150 steps; a broken loop, head or label stays at chance. The recipe's CONFIG is left as it was."""
    import copy
    from scripts import train_default as T
    from scripts.tower_shape import run
    before = copy.deepcopy(T.CONFIG)
    rows = run(steps=150, batch=8, n_train=200, n_test=60, vit_width=32, vit_layers=1, side=112, patch=28,
               task="colour", every=50, lr=3e-3, log=lambda *_: None)
    assert [r["step"] for r in rows] == [50, 100, 150]
    assert rows[-1]["accuracy"] >= 0.55, rows
    assert T.CONFIG == before


def test_tower_diagnostic_object_share_marks_the_drawn_object():
    """scripts/tower_shape.object_share (the objmean pooling's oracle of where the object is): a patch wholly
    inside a drawn block counts 1, half inside 0.5, the light background and the white margin 0 — on a picture
    drawn here; on real one-object pictures some patches count and fewer than half."""
    from scripts.tower_shape import object_share, pictures
    x = np.full((1, 112, 112, 3), 255, np.uint8)
    x[0, :56, :56] = (242, 240, 232)  # the task's light background
    x[0, 28:56, 56:98] = S.COLOURS["red"]  # patch (1, 2) whole, patch (1, 3) half
    share = object_share(x, 28).numpy().reshape(4, 4)
    want = np.zeros((4, 4), np.float32)
    want[1, 2], want[1, 3] = 1.0, 0.5
    np.testing.assert_allclose(share, want)
    x, _ = pictures(4, 91_500_000, 112, "shape")
    for im, s in zip(x, object_share(x, 28).numpy()):
        assert 0 < s.sum() < len(s) / 2  # an object, smaller than the picture


def test_tower_diagnostic_pools():
    """scripts/tower_shape.pooled: max and mean as named; objmean averages only the object's patches; attn with
    a query started at std 0.02 is the mean to within 5 % of the features' spread (a language model's attention
    starts as uniform), and a query started at std 3 is not."""
    import torch
    from scripts.tower_shape import pooled
    torch.manual_seed(0)
    f = torch.randn(2, 16, 64)
    np.testing.assert_allclose(pooled(f, "max").numpy(), f.numpy().max(1))
    np.testing.assert_allclose(pooled(f, "mean").numpy(), f.numpy().mean(1), rtol=1e-6, atol=1e-6)
    x = np.full((2, 112, 112, 3), 255, np.uint8)
    x[:, 28:56, 56:84] = S.COLOURS["blue"]  # patch 6 only
    np.testing.assert_allclose(pooled(f, "objmean", x=x).numpy(), f[:, 6].numpy(), rtol=1e-6)
    q = torch.nn.Linear(64, 1, bias=False)
    for std, close in ((0.02, True), (3.0, False)):
        torch.nn.init.normal_(q.weight, std=std)
        err = float((pooled(f, "attn", q) - f.mean(1)).detach().abs().max() / f.std())
        assert (err < 0.05) == close, (std, err)
    with pytest.raises(ValueError):
        pooled(f, "median")


def test_tower_diagnostic_reads_colour_over_the_object():
    """The oracle pool of scripts/tower_shape.py (the mean over the object's own patches) reads colour, which
    survives averaging, well above chance at toy size; an oracle that looked at the wrong patches would not."""
    from scripts.tower_shape import run
    rows = run(steps=150, batch=8, n_train=200, n_test=60, vit_width=32, vit_layers=1, side=112, patch=28,
               task="colour", every=150, lr=3e-3, pool="objmean", log=lambda *_: None)
    assert rows[-1]["accuracy"] >= 0.5, rows

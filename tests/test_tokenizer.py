"""Tokenizer tests: the real InternLM2 tokenizer.model and the golden tiny one."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from ixc25_ms.tokenizer import IncrementalDecoder, InternLM2Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
REAL = os.path.join(DATA, "internlm2-tokenizer.model")
TINY_DIR = os.path.join(DATA, "official-tiny")

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "多模态大模型浦语·灵笔可以理解图像。",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "runs   of    spaces\n\n\n\tand\ttabs\r\n",
    "emoji 😀👍🏽 and flags 🇨🇳, rare 𝕏 ok",
    "[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n",
    "literal <s> and </s> and <unk> in text",
    "numbers 1234567890 3.14159",
    "\n",
    "   ",
    "mixed 中文 English 日本語 한국어 русский",
]


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained(REAL)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=REAL)


@pytest.fixture(scope="module")
def tiny():
    return InternLM2Tokenizer.from_pretrained(TINY_DIR)


# ---- special ids (spec §7)
def test_special_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.eot_token_id == 92542 and tok.sot_token_id == 92543
    assert tok.vocab_size == len(tok) == 92544
    assert tok.encode("\n", add_special_tokens=False) == [364]
    assert tok.convert_tokens_to_ids(["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]", "<s>"]) == [92542, 92543, 1]
    assert tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]") == 92527
    assert tok.convert_tokens_to_ids("no-such-piece-xyz") == 0
    assert tok.convert_ids_to_tokens([1, 364, 92543]) == ["<s>", "\n", "[UNUSED_TOKEN_146]"]
    assert tok.convert_ids_to_tokens([1, 364, 2, 0], skip_special_tokens=True) == ["\n"]
    assert tok.convert_ids_to_tokens(92542) == "[UNUSED_TOKEN_145]"


def test_tiny_marker_ids(tiny):
    assert (tiny.sot_token_id, tiny.eot_token_id) == (3, 4)
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id, tiny.unk_token_id) == (1, 2, 2, 0)
    assert len(tiny) == 400


# ---- encoding: plain sentencepiece is the spec, plus BOS
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(tok, sp, text):
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok(text).input_ids == [1] + sp.encode(text)
    assert tok(text)["attention_mask"] == [1] * (len(sp.encode(text)) + 1)
    assert tok.tokenize(text) == sp.encode(text, out_type=str)


def test_literal_bos_is_text(tok):
    assert tok.encode("<s>", add_special_tokens=False) == [43618, 330]  # spec §7 / §11
    assert tok.tokenize("<s>") == ["<s", ">"]
    assert tok.encode("<s>[UNUSED_TOKEN_146]user\n")[:3] == [1, 43618, 330]


def test_turn_markers_inside_text(tok, sp):
    ids = tok.encode("[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n", add_special_tokens=False)
    assert ids == [92543] + sp.encode("user\nhi") + [92542, 364]


def test_empty_text(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_special_tokens=False) == []


def test_return_tensors(tok, sp):
    enc = tok("你好 world", return_tensors="np")
    assert enc.input_ids.dtype == np.int64 and enc.input_ids.shape == (1, len(sp.encode("你好 world")) + 1)
    assert enc["input_ids"][0].tolist() == [1] + sp.encode("你好 world")
    torch = pytest.importorskip("torch")
    pt = tok("abc", return_tensors="pt").input_ids
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.int64 and pt[0, 0].item() == 1


def test_batch_padding(tok, sp):
    enc = tok(["a", "hello world again"], padding=True, return_tensors="np")
    n = len(sp.encode("hello world again")) + 1
    assert enc.input_ids.shape == (2, n)
    assert enc.input_ids[0].tolist() == [1] + sp.encode("a") + [2] * (n - 1 - len(sp.encode("a")))
    assert enc.attention_mask[0].tolist() == [1] * (1 + len(sp.encode("a"))) + [0] * (n - 1 - len(sp.encode("a")))
    with pytest.raises(ValueError):
        tok(["a", "hello world again"], return_tensors="np")


# ---- decoding
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_sentencepiece_without_specials(tok, sp, text):
    ids = sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode(np.array(ids)) == sp.decode(ids)


def test_skip_special_tokens_keeps_markers(tok, sp):
    body = sp.encode("assistant\nok")
    ids = [1, 92543] + body + [92542, 364, 2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "[UNUSED_TOKEN_146]assistant\nok[UNUSED_TOKEN_145]\n"


def test_decode_keeps_special_text_with_official_spacing(tok, sp):
    # official convert_tokens_to_string: a space before the run that precedes a special token
    assert tok.decode([1] + sp.encode("hi")) == " <s>hi"
    assert tok.decode([1] + sp.encode("hi") + [2]) == " <s> hi</s>"
    assert tok.decode([1, 2]) == " <s></s>"
    assert tok.decode([0]) == " <unk>"


def test_decode_applies_clean_up_tokenization(tok, sp):
    # the official convert_tokens_to_string always calls transformers' clean_up_tokenization
    assert tok.decode(sp.encode("Hello , world ! Why ? I 'm here .")) == "Hello, world! Why? I'm here."


def test_decode_unfinished_bytes(tok, sp):
    e4, b8, ad = (sp.piece_to_id(p) for p in ("<0xE4>", "<0xB8>", "<0xAD>"))
    assert tok.decode([e4, b8, ad]) == "中"
    assert tok.decode([e4, b8]) == sp.decode([e4, b8])
    assert "\ufffd" in tok.decode([e4, b8])
    with pytest.raises(ValueError):
        tok.decode(np.array([[1, 2]]))


# ---- incremental decoder
def _stream(tok, ids, skip=True):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    parts = [dec.put(i) for i in ids]
    parts.append(dec.flush())
    assert dec.text == "".join(parts)
    return parts


@pytest.mark.parametrize("text", TEXTS + ["Hello , world ! Why ? I 'm here . It 's n't x ' y"])
def test_incremental_equals_full(tok, text):
    ids = tok.encode(text) + [2]
    assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_holds_split_emoji(tok, sp):
    ids = sp.encode("a😀")
    assert [sp.id_to_piece(i) for i in ids] == ["a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    parts = _stream(tok, ids)
    assert parts == ["a", "", "", "", "😀", ""]


def test_incremental_cleanup_across_pieces(tok, sp):
    # one piece per character, so every cleanup pattern straddles put() boundaries
    ids = [sp.piece_to_id(p) for p in ["x", "▁", "n", "'", "t", "▁", "'", "▁", "s", "▁", "'", "re", "▁", "."]]
    assert tok.decode(ids) == "xn't's're."
    parts = _stream(tok, ids)
    assert "".join(parts) == "xn't's're."
    assert all("\ufffd" not in x for x in parts)


def test_incremental_random_ids(tok, sp):
    rng = random.Random(0)
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    pool = byte_ids * 4 + [0, 1, 2, 364, 92542, 92543] + sp.encode(" , . ' n't 's 're 've m ? ! a b 中 ")
    for _ in range(300):
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_incremental_keep_specials(tok, sp):
    ids = sp.encode("hi")
    assert "".join(_stream(tok, ids, skip=False)) == tok.decode(ids)
    # specials are emitted verbatim, without the official decode's retroactive space
    assert "".join(_stream(tok, [1] + ids + [2], skip=False)) == "<s>hi</s>"


# ---- loading errors
def test_from_pretrained_dir_and_errors(tmp_path):
    shutil.copy(REAL, tmp_path / "tokenizer.model")
    assert InternLM2Tokenizer.from_pretrained(str(tmp_path)).eot_token_id == 92542
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        InternLM2Tokenizer.from_pretrained(str(missing))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad"):
        InternLM2Tokenizer.from_pretrained(str(bad))


# ---- golden tiny case (official run)
def test_golden_tiny_prompt_ids(tiny):
    expected = np.load(os.path.join(TINY_DIR, "expected.npz"))
    prompt = "[UNUSED_TOKEN_146]user\nDescribe this image in detail.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    assert tiny(prompt, add_special_tokens=False).input_ids == expected["text_part1_ids"].reshape(-1).tolist()
    assert tiny("", add_special_tokens=True).input_ids == expected["text_part0_ids"].reshape(-1).tolist() == [1]


def test_golden_tiny_response(tiny):
    with open(os.path.join(TINY_DIR, "case.json"), encoding="utf-8") as f:
        case = json.load(f)
    assert tiny.decode(case["new_token_ids"], skip_special_tokens=True) == case["response"]
    assert "".join(_stream(tiny, case["new_token_ids"])) == case["response"]


def test_assistant_header_split_as_the_label_mask_assumes(tok, tmp_path):
    """The official label mask skips 6 fixed positions after a user turn: the official tokenizer's
    `\\n [UNUSED_TOKEN_146] ass istant \\n`. A task tokenizer with 'assistant' as one piece would leave the first
    word of every answer untrained (it happened: notes/default-model.md); ixc25-finetune warns, and
    train_tiny_tokenizer(pieces=('ass', 'istant')) splits it as the official one does."""
    from ixc25_ms.tiny import train_tiny_tokenizer
    from ixc25_ms.train.data import assistant_header_warning
    assert assistant_header_warning(tok) is None
    corpus = ["[UNUSED_TOKEN_146]assistant\nThe circle is red.[UNUSED_TOKEN_145]\n"] * 50 + ["a red circle"] * 20
    for pieces, want in (((), "the first 1 token(s) of every answer get no label"), (("ass", "istant"), None)):
        d = tmp_path / f"t{len(pieces)}"
        train_tiny_tokenizer(str(d / "tokenizer.model"), vocab_size=300, corpus=corpus, pieces=pieces)
        t = InternLM2Tokenizer.from_pretrained(str(d))
        got = assistant_header_warning(t)
        assert (got is None) if want is None else (want in got), got

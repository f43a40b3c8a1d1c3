"""Tests of the on-the-spot tiny tokenizer trainer."""
import os
import subprocess
import sys

import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from ixc25_ms.tiny import train_tiny_tokenizer
from ixc25_ms.tokenizer import InternLM2Tokenizer

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "official-tiny", "tokenizer.model")


def _proto(path):
    m = pb.ModelProto()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    return m


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny") / "tokenizer.model"))


def test_deterministic(model_path, tmp_path):
    other = train_tiny_tokenizer(str(tmp_path / "again.model"))
    with open(model_path, "rb") as a, open(other, "rb") as b:
        assert a.read() == b.read()
    # a fresh interpreter too
    third = str(tmp_path / "third.model")
    code = f"from ixc25_ms.tiny import train_tiny_tokenizer as t; t({third!r})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True)
    with open(model_path, "rb") as a, open(third, "rb") as b:
        assert a.read() == b.read()


def test_vocab_range(tmp_path):
    from ixc25_ms.tiny import MAX_VOCAB, MIN_VOCAB
    for v in (MIN_VOCAB, 1000):
        assert len(InternLM2Tokenizer(train_tiny_tokenizer(str(tmp_path / f"{v}.model"), vocab_size=v))) == v
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(str(tmp_path / "x.model"), vocab_size=MAX_VOCAB + 1)


def test_settings_mirror_golden(model_path):
    ours, gold = _proto(model_path), _proto(GOLDEN)
    ours.trainer_spec.ClearField("num_threads")
    gold.trainer_spec.ClearField("num_threads")
    assert ours.trainer_spec == gold.trainer_spec
    assert ours.normalizer_spec == gold.normalizer_spec
    types = lambda m: sorted(p.type for p in m.pieces)  # noqa: E731
    assert types(ours) == types(gold)
    assert [p.piece for p in ours.pieces[:6]] == [p.piece for p in gold.pieces[:6]]


def test_markers_and_ids(model_path):
    tok = InternLM2Tokenizer.from_pretrained(model_path)
    assert len(tok) == 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.sot_token_id, tok.eot_token_id) == (3, 4)
    assert tok.convert_tokens_to_ids("[UNUSED_TOKEN_130]") == 5
    prompt = "[UNUSED_TOKEN_146]user\nDescribe this image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    ids = tok.encode(prompt)
    assert ids[:2] == [1, 3] and ids.count(3) == 2 and ids.count(4) == 1


@pytest.mark.parametrize("text", ["Describe this image in detail.", "这是一张图片 😀 and 未知字",
                                  "def f(x):\n    return x  # 42\n", "<s> literal", "  spaces  \n\n"])
def test_round_trip(model_path, text):
    tok = InternLM2Tokenizer.from_pretrained(model_path)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("1234", add_special_tokens=False) == tok.convert_tokens_to_ids(list("1234"))  # split_digits

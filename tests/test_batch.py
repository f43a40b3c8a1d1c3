"""batch_chat on the golden tiny checkpoint: rows equal single-prompt greedy chat(), bounded jit shapes,
jit == PyNative for the whole generate."""
import os

import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.batch import PROMPT_BUCKET, batch_chat, pad_batch
from ixc25_ms.chat import eos_ids, prepare_chat
from ixc25_ms.generation import GenerationConfig, generate
from parity_tests.helpers import GOLDEN

IMG = os.path.join(GOLDEN, "input_image.png")
QUERIES = ["Describe this image in detail.",
           "What is the capital of France? Please answer in one short sentence, and explain why.",
           "Hi"]
IMAGES = [[IMG], None, ()]  # image / text-only path / interleaved path without image
N_NEW = 8


@pytest.fixture(scope="module")
def tiny():
    return ixc25_ms.load(GOLDEN)


def test_batch_rows_equal_single_chat(tiny):
    model, tok = tiny
    model.use_jit = False
    singles = [model.chat(tok, q, img, max_new_tokens=N_NEW, do_sample=False)[0] for q, img in zip(QUERIES, IMAGES)]
    batched = model.batch_chat(tok, QUERIES, IMAGES, max_new_tokens=N_NEW, do_sample=False)
    assert batched == singles
    # also the raw ids, row by row, against unpadded single-prompt generate
    rows = [prepare_chat(model, tok, q, img, 24, (), False, "") for q, img in zip(QUERIES, IMAGES)]
    lens = [int(r[0].shape[1]) for r in rows]
    assert len(set(lens)) == 3
    emb, im, am, seeds = pad_batch(rows, model.cfg.bos_token_id)
    assert emb.shape[1] % PROMPT_BUCKET == 0 and (am.sum(1) == lens).all()
    gen = GenerationConfig(max_new_tokens=N_NEW, eos_token_id=eos_ids(tok), repetition_penalty=1.005)
    out = generate(model, emb, im, am, gen, prompt_ids=seeds)
    for r, (e, m, ids) in enumerate(rows):
        single = generate(model, e, m, None, gen, prompt_ids=ids)[0]
        assert out[r, : len(single)].tolist() == single.tolist(), f"row {r}"


def test_batch_argument_errors(tiny):
    model, tok = tiny
    assert batch_chat(model, tok, []) == []
    with pytest.raises(TypeError):
        batch_chat(model, tok, "one string")
    with pytest.raises(ValueError, match="image entries"):
        batch_chat(model, tok, ["a", "b"], [None])
    with pytest.raises(ValueError, match="num_beams"):
        batch_chat(model, tok, ["a"], num_beams=2)


def test_jit_shapes_bounded_and_equal_to_pynative(tiny, monkeypatch):
    model, tok = tiny
    prompts = [["Hi"], ["Hello there, how are you?"], ["Tell me a story about a cat and a dog.", "Why?"]]
    model.use_jit = False
    eager = [model.batch_chat(tok, q, [None] * len(q), max_new_tokens=4) for q in prompts]
    seen = []  # the shapes the compiled prefill/decode steps are called with
    prefill_jit, decode_jit = type(model)._prefill_jit, type(model)._decode_jit

    def spy_prefill(self, h, im_mask, cos, sin, attn_mask, cap, *rest):
        seen.append((tuple(h.shape), True, int(cap)))
        return prefill_jit(self, h, im_mask, cos, sin, attn_mask, cap, *rest)

    def spy_decode(self, x, mq, mk, attn_mask, ks, *rest):
        seen.append((tuple(x.shape), False, int(ks[0].shape[1])))
        return decode_jit(self, x, mq, mk, attn_mask, ks, *rest)

    monkeypatch.setattr(type(model), "_prefill_jit", spy_prefill)
    monkeypatch.setattr(type(model), "_decode_jit", spy_decode)
    model.use_jit = True
    try:
        jitted = [model.batch_chat(tok, q, [None] * len(q), max_new_tokens=4) for q in prompts]
    finally:
        model.use_jit = False
    assert jitted == eager
    # three prompt lengths, batch sizes 1 and 2: one prefill and one decode signature per batch size
    assert len(set(seen)) == 4, sorted(set(seen))


def test_whole_generate_jit_equals_pynative(tiny):
    model, tok = tiny
    rows = [prepare_chat(model, tok, q, img, 24, (), False, "") for q, img in zip(QUERIES, IMAGES)]
    emb, im, am, seeds = pad_batch(rows, model.cfg.bos_token_id)
    gen = GenerationConfig(max_new_tokens=N_NEW, eos_token_id=None, repetition_penalty=1.005)
    model.use_jit = False
    a = generate(model, emb, im, am, gen, prompt_ids=seeds)
    model.use_jit = True
    try:
        b = generate(model, emb, im, am, gen, prompt_ids=seeds)
    finally:
        model.use_jit = False
    np.testing.assert_array_equal(a, b)

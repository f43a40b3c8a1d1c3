"""batch_chat on the golden tiny checkpoint: rows equal single-prompt greedy chat(), bounded jit shapes,
jit == PyNative for the whole generate."""
import os

import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.batch import PROMPT_BUCKET, batch_chat, pad_batch
from ixc25_ms.chat import _prepare_chat, eos_ids
from ixc25_ms.generate import GenerationConfig, generate
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
    rows = [_prepare_chat(model, tok, q, img, 24, (), False, "") for q, img in zip(QUERIES, IMAGES)]
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
    seen = []
    orig = type(model)._run

    def spy(self, h, im_mask, cos, sin, attn_mask, ks, vs, write_pos, cap, *rest):
        if self.use_jit:  # the shapes _body_jit is compiled for
            seen.append((tuple(h.shape), ks is None, int(cap)))
        return orig(self, h, im_mask, cos, sin, attn_mask, ks, vs, write_pos, cap, *rest)

    monkeypatch.setattr(type(model), "_run", spy)
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
    rows = [_prepare_chat(model, tok, q, img, 24, (), False, "") for q, img in zip(QUERIES, IMAGES)]
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

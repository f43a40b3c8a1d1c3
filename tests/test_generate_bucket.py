"""generate() under jit left-pads prompts to a multiple of PROMPT_BUCKET: one compiled prefill shape for
prompts of lengths 5, 17, 40, and the same ids (greedy, sampling, beams) as PyNative on the unpadded prompt."""
import mindspore as ms
import numpy as np
import pytest

from ixc25_ms.generation import PROMPT_BUCKET, GenerationConfig, bucket_length, generate, iter_generate, left_pad
from parity_tests.helpers import build_ms_lm, random_lm_state, tiny_config

LENS = (5, 17, 40)


@pytest.fixture(scope="module")
def lms():
    cfg = tiny_config()
    state = random_lm_state(cfg, seed=3)
    return cfg, build_ms_lm(cfg, state), build_ms_lm(cfg, state, use_jit=True)


def _prompt(cfg, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, n, cfg.hidden_size)).astype(np.float32)
    im = np.zeros((1, n), bool)
    im[0, 1: max(2, n // 2)] = True  # an image span, as a real prompt has
    return ms.Tensor(x), im


def test_bucket_length_and_left_pad():
    assert [bucket_length(n, 64) for n in (1, 64, 65)] == [64, 64, 128]
    assert bucket_length(7, None) == bucket_length(7, 1) == 7
    e, m, a = left_pad(ms.Tensor(np.ones((1, 3, 4), np.float32)), np.ones((1, 3), bool), np.ones((1, 3), np.int64), 2)
    assert e.shape == (1, 5, 4) and not e.asnumpy()[0, :2].any()
    assert m.tolist() == [[False, False, True, True, True]] and a.tolist() == [[0, 0, 1, 1, 1]]
    e2, m2, a2 = left_pad(e, None, a, 0)
    assert e2 is e and m2 is None and a2 is a


def test_jit_compiles_one_prefill_shape_and_matches_pynative(lms, monkeypatch):
    cfg, eager, jit = lms
    seen = []  # (input shape, prefill?, cache slots) of every compiled-step call
    prefill_jit, decode_jit = type(jit)._prefill_jit, type(jit)._decode_jit

    def spy_prefill(self, h, im_mask, cos, sin, attn_mask, cap, *rest):
        seen.append((tuple(h.shape), True, int(cap)))
        return prefill_jit(self, h, im_mask, cos, sin, attn_mask, cap, *rest)

    def spy_decode(self, x, mq, mk, attn_mask, ks, *rest):
        seen.append((tuple(x.shape), False, int(ks[0].shape[1])))
        return decode_jit(self, x, mq, mk, attn_mask, ks, *rest)

    monkeypatch.setattr(type(jit), "_prefill_jit", spy_prefill)
    monkeypatch.setattr(type(jit), "_decode_jit", spy_decode)
    for i, n in enumerate(LENS):
        x, im = _prompt(cfg, n, i)
        gen = GenerationConfig(max_new_tokens=6, eos_token_id=None, repetition_penalty=1.005)
        a = generate(eager, x, im, None, gen)
        b = generate(jit, x, im, None, gen)
        np.testing.assert_array_equal(a, b, err_msg=f"prompt length {n}")
        c = np.stack(list(iter_generate(jit, x, im, None, gen)), 1)
        np.testing.assert_array_equal(a, c, err_msg=f"iter_generate, prompt length {n}")
    prefill = {s for s in seen if s[1]}
    decode = {s for s in seen if not s[1]}
    assert prefill == {((1, PROMPT_BUCKET, cfg.hidden_size), True, 2 * PROMPT_BUCKET)}, prefill
    assert len(decode) == 1, decode


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_k=5, seed=7), dict(num_beams=2, length_penalty=1.0)])
def test_jit_padded_sampling_and_beams_equal_pynative(lms, kw):
    cfg, eager, jit = lms
    x, im = _prompt(cfg, 17, 1)
    gen = GenerationConfig(max_new_tokens=5, eos_token_id=None, **kw)
    np.testing.assert_array_equal(generate(eager, x, im, None, gen), generate(jit, x, im, None, gen))


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=2, length_penalty=1.0)])
def test_no_graph_compiled_again_across_prompts(lms, kw):
    """Real compilations (MindSpore's own compile-phase cache), not call shapes: after one generate, prompts
    of other lengths in the same bucket — each with fresh in-place cache Parameters, and for beams a
    cache reorder every step — compile nothing new."""
    from mindspore.graph import api  # ms_compile_cache: the set of compiled phases (mindspore 2.10)
    cfg, _, jit = lms
    gen = GenerationConfig(max_new_tokens=5, eos_token_id=None, **kw)
    x, im = _prompt(cfg, LENS[0], 0)
    generate(jit, x, im, None, gen)
    compiled = len(api.ms_compile_cache)
    for i, n in enumerate(LENS[1:], 1):
        x, im = _prompt(cfg, n, i)
        generate(jit, x, im, None, gen)
    assert len(api.ms_compile_cache) == compiled, "a graph was compiled again"
    x, im = _prompt(cfg, PROMPT_BUCKET + 5, 9)  # the next bucket: the counter must see its compilation
    generate(jit, x, im, None, gen)
    assert len(api.ms_compile_cache) > compiled

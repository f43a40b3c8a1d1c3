"""Language-model parity rows: MindSpore port vs our PyTorch reference, and vs the official golden case."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
import torch

from ixc25_ms.generation import generate
from ixc25_ms.language import RMSNorm, RotaryTable
from parity_tests.helpers import GOLDEN, build_ms_lm, load_golden, random_lm_state, tiny_config
from parity_tests.reference.language import RefLM, Rope, rms_norm
from parity_tests.tolerance import assert_close

MODES = ("base", "write", "web")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    state = random_lm_state(cfg, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 12, cfg.hidden_size)).astype(np.float32)
    im = np.zeros((2, 12), bool)
    im[:, 2:7] = True
    im[1, 9] = True
    return cfg, state, x, im


def test_rmsnorm_row():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32) * 3
    w = rng.standard_normal(64).astype(np.float32)
    n = RMSNorm(64, 1e-5)
    n.weight.set_data(ms.Tensor(w))
    assert_close(n(ms.Tensor(x)), rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5), "fp32", "rmsnorm")


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_rope_row(scaling):
    ours, ref = RotaryTable(16, 10000.0, 32, scaling), Rope(16, 10000.0, 32, scaling)
    for seq_len in (20, 50, 40):  # 50 > max_pos: dynamic NTK rebuilds; 40 afterwards keeps the 50 state
        pos = np.arange(seq_len)[None]
        ours.ensure(seq_len)
        c, s = ours.cos_sin(pos)
        rc, rs = ref(torch.from_numpy(pos), seq_len)
        assert_close(c, rc, "fp32", f"rope cos {scaling} L={seq_len}")
        assert_close(s, rs, "fp32", f"rope sin {scaling} L={seq_len}")
    if scaling and scaling["type"] == "dynamic":
        fresh = RotaryTable(16, 10000.0, 32, scaling)
        assert not np.allclose(fresh.inv_freq, ours.inv_freq), "dynamic NTK state should stick after L=50"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_image", [True, False])
def test_plora_row(tiny, mode, with_image):
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state)
    ref = RefLM(cfg, state)
    im = im if with_image else np.zeros_like(im)
    m = ms.Tensor(im.astype(np.float32)[..., None]) if with_image else None
    ours = lm.model.layers[0].attention.wqkv(ms.Tensor(x), m, mode)
    theirs = ref.plora("model.layers.0.attention.wqkv", torch.from_numpy(x), torch.from_numpy(im), mode)
    assert_close(ours, theirs, "fp32", f"plora wqkv {mode} image={with_image}")
    if with_image:  # the image LoRA must change image rows only
        base = lm.model.layers[0].attention.wqkv(ms.Tensor(x), None, mode).asnumpy()
        diff = np.abs(ours.asnumpy() - base).max(-1)
        assert (diff[~im] == 0).all() and (diff[im] > 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_decoder_layer_row(tiny, mode):
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state)
    ref = RefLM(cfg, state)
    l = x.shape[1]
    pos = np.tile(np.arange(l), (2, 1))
    cos, sin = lm.rope_tables(pos, l)
    from ixc25_ms.language import prefill_mask
    mask = prefill_mask(np.ones((2, l), np.int64))
    ours = lm.model.layers[0](ms.Tensor(x), ms.Tensor(im.astype(np.float32)[..., None]), cos, sin, ms.Tensor(mask),
                              mode)
    rc, rs = ref.rope(torch.from_numpy(pos), l)
    rmask = torch.from_numpy(mask)
    theirs, _ = ref.layer(0, torch.from_numpy(x), torch.from_numpy(im), rc, rs, rmask, None, mode)
    assert_close(ours, theirs, "fp32", f"decoder layer 0 {mode}")


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_full_lm_row(tiny, mode, use_jit):
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, use_jit=use_jit)
    ref = RefLM(cfg, state)
    ours = lm(ms.Tensor(x), im, None, mode)
    theirs, _, _ = ref.forward(torch.from_numpy(x), torch.from_numpy(im), None, mode)
    assert_close(ours, theirs, "fp32", f"full LM {mode} jit={use_jit}")


def test_full_lm_fp16_row(tiny):
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, dtype="float16")
    ref = RefLM(cfg, state)
    theirs, _, _ = ref.forward(torch.from_numpy(x), torch.from_numpy(im))
    assert_close(lm(ms.Tensor(x), im), theirs, "fp16", "full LM fp16 vs fp32 reference")


def test_padding_mask_row(tiny):
    """Left-padded rows: the logits of real positions equal the unpadded run (ours and reference)."""
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state)
    am = np.ones((2, 12), np.int64)
    am[1, :4] = 0
    ours = lm(ms.Tensor(x), im, am).asnumpy()
    ref = RefLM(cfg, state)
    theirs, _, _ = ref.forward(torch.from_numpy(x), torch.from_numpy(im), torch.from_numpy(am))
    assert_close(ours[1, 4:], theirs[1, 4:], "fp32", "left-padded row vs reference")
    alone = lm(ms.Tensor(x[1:, 4:]), im[1:, 4:]).asnumpy()
    assert_close(ours[1, 4:], alone[0], "fp32", "left-padded row vs unpadded run")


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["portable", "fused-cpu"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_cached_decode_equals_uncached(tiny, use_jit, cpu_kernels):
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, use_jit=use_jit, cpu_kernels=cpu_kernels)
    assert bool(lm.model.kernels) == cpu_kernels
    full = lm(ms.Tensor(x), im).asnumpy()
    p = 7
    logits, _, cache = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=16, last_only=True)
    assert_close(logits.asnumpy()[:, 0], full[:, p - 1], "fp32", "prefill last logits")
    for t in range(p, 12):  # positions >= 7 carry no image mask except row 1 pos 9: drop it for this check
        assert cache.offset == t and (cache.positions + 1).tolist() == [t, t]
        logits, _ = lm.decode(ms.Tensor(x[:, t:t + 1]), cache)
        ref_full = lm(ms.Tensor(x[:, : t + 1]), np.concatenate([im[:, :p], np.zeros((2, t + 1 - p), bool)], 1))
        assert_close(logits.asnumpy()[:, 0], ref_full.asnumpy()[:, t], "fp32",
                     f"decode step {t} jit={use_jit} cpu_kernels={cpu_kernels}")


@pytest.mark.parametrize("use_jit", [False, True])
def test_last_token_prefill_shortcuts(tiny, monkeypatch, use_jit):
    """A last-token prefill (generation) takes two shortcuts: causal query chunks of the portable ops (chunk size
    patched down to 2 rows here: 6 chunks of a 12-token prompt; PyNative) or the fused CPU attention (jit), and
    the last layer's output for the last row only. With a
    left-padded row, its last logits, the caches at valid slots and the decode steps after it equal the
    reference's full forward."""
    import ixc25_ms.language as L
    import ixc25_ms.language.model as LM
    monkeypatch.setattr(LM, "PREFILL_CHUNK", 2)
    cfg, state, x, im = tiny
    calls = []
    if not use_jit:  # count the query rows of each attention call (a graph cannot call back into Python)
        real = L.Attention._attend
        monkeypatch.setattr(L.Attention, "_attend", lambda self, *a: calls.append(a[0].shape[2]) or real(self, *a))
    lm = build_ms_lm(cfg, state, use_jit=use_jit)
    if not use_jit:  # the portable ops' chunks (with the fused CPU attention, as under jit here, none are needed)
        from ixc25_ms.fused_attention import use_fused_attention
        use_fused_attention(lm.model, False, dtype=lm.compute_dtype)
    ref = RefLM(cfg, state)
    am = np.ones((2, 12), np.int64)
    am[1, :3] = 0
    logits, _, cache = lm.prefill(ms.Tensor(x), im, am, cap=16, last_only=True)
    n = cfg.num_hidden_layers
    if not use_jit:
        assert calls == [2] * 6 * (n - 1) + [1], calls  # chunks in every layer but the last, one row there
    theirs, _, past = ref.forward(torch.from_numpy(x), torch.from_numpy(im), torch.from_numpy(am))
    assert logits.shape == (2, 1, cfg.vocab_size)
    assert_close(logits.asnumpy()[:, 0], theirs[:, -1], "fp32", f"chunked last-token prefill jit={use_jit}")
    kvh, d = cfg.num_key_value_heads, cfg.head_dim
    for i in range(n):
        got = cache.keys[i].asnumpy().reshape(2, kvh, 16, d)
        want = past[i][0].numpy()
        assert_close(got[0, :, :12], want[0], "fp32", f"k cache layer {i} row 0")
        assert_close(got[1, :, 3:12], want[1, :, 3:], "fp32", f"k cache layer {i} row 1 (valid slots)")
    key_valid = np.zeros((2, 16), np.int64)
    key_valid[:, :12] = am
    y = np.random.default_rng(9).standard_normal((2, 3, cfg.hidden_size)).astype(np.float32)
    for t in range(3):
        key_valid[:, 12 + t] = 1
        assert cache.offset == 12 + t and (cache.positions + 1).tolist() == [12 + t, 12 + t - 3]
        logits, _ = lm.decode(ms.Tensor(y[:, t:t + 1]), cache)
        assert np.array_equal(cache.key_valid, key_valid)
        r, _, past = ref.forward(torch.from_numpy(y[:, t:t + 1]), past=past,
                                 attention_mask=torch.from_numpy(key_valid[:, :13 + t]))
        assert_close(logits.asnumpy()[:, 0], r[:, -1], "fp32", f"decode after chunked prefill, step {t}")


def test_dynamic_ntk_past_max_positions():
    """Prefill and cached decode across max_position_embeddings with dynamic NTK, against the reference."""
    cfg = tiny_config(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    state = random_lm_state(cfg, seed=3)
    x = np.random.default_rng(4).standard_normal((1, 20, cfg.hidden_size)).astype(np.float32)
    lm, ref = build_ms_lm(cfg, state), RefLM(cfg, state)
    ours = lm(ms.Tensor(x[:, :12])).asnumpy()
    theirs, _, past = ref.forward(torch.from_numpy(x[:, :12]))
    assert_close(ours, theirs, "fp32", "dynamic NTK prefill below max")
    logits, _, cache = lm.prefill(ms.Tensor(x[:, :12]), cap=32)
    for t in range(12, 20):  # crosses 16: each step rebuilds the table for the longer length
        assert cache.offset == t and (cache.positions + 1).tolist() == [t]
        logits, _ = lm.decode(ms.Tensor(x[:, t:t + 1]), cache)
        r, _, past = ref.forward(torch.from_numpy(x[:, t:t + 1]), past=past,
                                 attention_mask=torch.ones(1, t + 1, dtype=torch.long))
        assert_close(logits.asnumpy()[:, 0], r[:, -1], "fp32", f"dynamic NTK decode t={t}")
    assert lm.rope.cached_len == 20 and ref.rope.cached == 20


# ------------------------------------------------------------------------------------ the official golden case
@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.mark.parametrize("mode,key,zero", [("base", "logits", False), ("write", "logits_infer_write", False),
                                           ("web", "logits_infer_web", False), ("base", "logits_im_mask_zero", True)])
def test_golden_logits(golden, mode, key, zero):
    cfg, state, exp = golden
    im = exp["im_mask"].astype(bool) & (not zero)
    lm = build_ms_lm(cfg, state)
    m = assert_close(lm(ms.Tensor(exp["inputs_embeds"]), im, None, mode), exp[key], "fp32", f"golden {key} ms")
    assert m["rel_fro"] < 1e-6
    ref = RefLM(cfg, state)
    r, _, _ = ref.forward(torch.from_numpy(exp["inputs_embeds"]), torch.from_numpy(im), None, mode)
    assert_close(r, exp[key], "fp32", f"golden {key} torch reference")


def test_golden_last_hidden_state(golden):
    cfg, state, exp = golden
    lm = build_ms_lm(cfg, state)
    _, h, _ = lm.prefill(ms.Tensor(exp["inputs_embeds"]), exp["im_mask"], last_only=False)
    assert_close(h, exp["last_hidden_state"], "fp32", "golden last_hidden_state")


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["portable", "fused-cpu"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_golden_greedy_ids(golden, use_jit, cpu_kernels):
    cfg, state, exp = golden
    case = json.load(open(os.path.join(GOLDEN, "case.json")))
    g = case["generate"]
    lm = build_ms_lm(cfg, state, use_jit=use_jit, cpu_kernels=cpu_kernels)
    ids = generate(lm, ms.Tensor(exp["inputs_embeds"]), exp["im_mask"], max_new_tokens=g["max_new_tokens"],
                   do_sample=False, repetition_penalty=g["repetition_penalty"], eos_token_id=g["eos_token_id"])
    assert ids[0].tolist() == exp["gen_ids"][0, 1:].tolist() == case["new_token_ids"]
    ids = generate(lm, ms.Tensor(exp["inputs_embeds"]), exp["im_mask"], max_new_tokens=8, repetition_penalty=1.0,
                   eos_token_id=g["eos_token_id"])
    assert ids[0].tolist() == exp["gen_ids_norep"][0, 1:].tolist()


def test_flash_attention_switch_is_ascend_only():
    """The fused kernel exists only on Ascend (fp16/bf16): automatic off here, forcing it is a clear error."""
    import mindspore as ms
    from ixc25_ms.language import InternLM2ForCausalLM, flash_attention_switch
    assert ms.get_context("device_target") == "CPU"
    assert flash_attention_switch(ms.float16) is False and flash_attention_switch(ms.float32) is False
    with pytest.raises(ValueError, match="Ascend"):
        InternLM2ForCausalLM(tiny_config(), dtype="float16", flash_attention=True)
    lm = InternLM2ForCausalLM(tiny_config(), dtype="float16")
    assert not lm.flash_attention and not any(l.attention.flash for l in lm.model.layers)


@pytest.mark.parametrize("use_jit", [False, True])
def test_cache_written_in_place_and_reordered(tiny, use_jit):
    """decode writes the new slot of the (B*kvh, C, d) cache Parameters in place and touches nothing else;
    reorder permutes batch rows into new caches and leaves the old ones as they were."""
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, use_jit=use_jit)
    p, n, cap = 7, 11, 16
    im_dec = np.concatenate([im[:, :p], np.zeros((2, n - p), bool)], 1)  # decoded tokens carry no image mask
    _, _, cache = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=cap)
    ks, vs = cache.keys, cache.values
    for t in range(p, n):
        lm.decode(ms.Tensor(x[:, t:t + 1]), cache)
        assert all(a is b for a, b in zip(cache.keys + cache.values, ks + vs)), "decode must write the given caches"
    _, _, full_cache = lm.prefill(ms.Tensor(x[:, :n]), im_dec, cap=cap)  # the same n tokens in one uncached pass
    kvh, d = cfg.num_key_value_heads, cfg.head_dim
    for i, (ours, full) in enumerate(zip(ks + vs, full_cache.keys + full_cache.values)):
        ours = ours.asnumpy().reshape(2, kvh, cap, d)
        full = full.asnumpy().reshape(2, kvh, cap, d)
        assert_close(ours[:, :, :n], full[:, :, :n], "fp32", f"cache {i} slots [0, {n})")
        assert not ours[:, :, n:].any(), f"cache {i}: slots past the written ones must stay zero"
    before = [c.asnumpy().copy() for c in ks]
    swapped = cache.reorder([1, 0])
    for old, new, b in zip(ks, swapped.keys, before):
        assert np.array_equal(new.asnumpy().reshape(2, -1, d)[::-1], b.reshape(2, -1, d))
        assert np.array_equal(old.asnumpy(), b), "reorder must not modify its input"
    assert np.array_equal(swapped.positions, cache.positions[::-1]) and swapped.offset == cache.offset
    with pytest.raises(ValueError, match="batch rows"):
        cache.reorder([0, 1, 0])


def test_decode_cache_inputs_checked_and_tensors_accepted(tiny):
    from ixc25_ms.language import KVCache
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, use_jit=True)
    p, cap = 7, 12
    kvh, d = cfg.num_key_value_heads, cfg.head_dim
    _, _, a = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=cap)
    k4 = [k.asnumpy().reshape(2, kvh, cap, d).copy() for k in a.keys]  # the same caches as (B, kvh, C, d) arrays
    v4 = [v.asnumpy().reshape(2, kvh, cap, d).copy() for v in a.values]
    key_valid = np.zeros((2, cap), np.int64)
    key_valid[:, :p] = 1
    for c in k4 + v4:  # junk in the slots that are not valid (the one decode writes included) is ignored
        c[:, :, p:] = 1e3
    pos = np.array([p - 1, p - 1])
    b = KVCache.from_arrays(k4, v4, key_valid, pos, p, ms.float32)
    step = ms.Tensor(x[:, p:p + 1])
    la = lm.decode(step, a)
    lb = lm.decode(step, b)
    assert_close(lb[0], la[0].asnumpy(), "fp32", "decode from (B,kvh,C,d) arrays vs prefill caches")
    assert all(isinstance(c, ms.Parameter) for c in b.keys + b.values)
    for ours, theirs in zip(a.keys + a.values, b.keys + b.values):
        assert_close(theirs, ours.asnumpy(), "fp32", "caches after the step")
    kv1 = key_valid.copy()
    kv1[:, p] = 1
    with pytest.raises(ValueError, match="already written"):
        lm.decode(step, KVCache(b.keys, b.values, kv1, pos, p))  # decode appends: the same slot of the same caches
    with pytest.raises(ValueError, match="already written"):
        lm.decode(step, KVCache(a.keys, a.values, kv1, pos, p))  # the other cache set's step (alternating sets)
    _, _, c2 = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=cap)
    with pytest.raises(ValueError, match=f"slots up to {p - 1}"):
        lm.decode(step, KVCache(c2.keys, c2.values, kv1, pos, p - 2))  # inside the prompt
    swapped = a.reorder([1, 0])
    with pytest.raises(ValueError, match="already written"):
        lm.decode(step, KVCache(swapped.keys, swapped.values, kv1, pos, p))  # beam reordering keeps what they hold
    with pytest.raises(ValueError, match="one per layer"):
        lm.decode(step, KVCache(c2.keys[:-1], c2.values[:-1], kv1, pos, p))
    with pytest.raises(ValueError, match="neither a prefill cache"):
        lm.decode(step, KVCache.from_arrays([k[:, :, :, :-1] for k in k4], v4, key_valid, pos, p, ms.float32))
    with pytest.raises(ValueError, match="outside the cache capacity"):
        lm.decode(step, KVCache(c2.keys, c2.values, np.ones((2, cap), np.int64), pos, cap))


def test_cached_decode_fp16_jit(tiny):
    """fp16 compute: prefill + in-place cached decode against the uncached fp16 forward."""
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, dtype="float16", use_jit=True)
    p, n, cap = 7, 10, 16
    _, _, cache = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=cap)
    assert all(c.dtype == ms.float16 for c in cache.keys + cache.values)
    for t in range(p, n):
        logits, _ = lm.decode(ms.Tensor(x[:, t:t + 1]), cache)
    full = lm(ms.Tensor(x[:, :n]), np.concatenate([im[:, :p], np.zeros((2, n - p), bool)], 1)).asnumpy()
    assert_close(logits.asnumpy()[:, 0], full[:, n - 1], "fp16", "fp16 cached decode vs uncached")


@pytest.mark.parametrize("use_jit", [False, True])
def test_decode_keeps_no_cache_alive(tiny, use_jit):
    """The model keeps no reference to the caches a decode step wrote (only a mark on each): caches the caller
    drops are freed (at 7B size they are gigabytes)."""
    import gc
    import weakref
    cfg, state, x, im = tiny
    lm = build_ms_lm(cfg, state, use_jit=use_jit)
    p, cap = 7, 12
    _, _, cache = lm.prefill(ms.Tensor(x[:, :p]), im[:, :p], cap=cap)
    lm.decode(ms.Tensor(x[:, p:p + 1]), cache)[0].asnumpy()
    refs = [weakref.ref(c) for c in cache.keys + cache.values]
    del cache
    gc.collect()
    assert all(r() is None for r in refs), "a KV cache outlived its last user"

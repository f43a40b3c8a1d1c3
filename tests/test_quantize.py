"""Weight-only int8 (ixc25_ms.quantize): round trip, kernels vs numpy, golden logits and ids, pre-quantised
checkpoints, lazy write/web LoRAs, ixc25-convert --quantize."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import ixc25_ms
from converters.cli import main as convert_main
from ixc25_ms.quantize import (GEMV_MAX_ROWS, Int8Matmul, dequantize_int8, pack_rows, packable, quantize_int8,
                               relative_error, to_float16, unpack_rows)
from ixc25_ms.quantize.kernels import F16Matmul, cpu_quant_kernels
from ixc25_ms.weights.safetensors import SafetensorsFile
from ixc25_ms.weights.tags import bf16_to_f32, f32_to_bf16
from parity_tests.helpers import GOLDEN
from parity_tests.tolerance import assert_close

CASE = json.load(open(os.path.join(GOLDEN, "case.json")))


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "expected.npz")))


@pytest.fixture(scope="module")
def fp32_logits(golden):
    model, _ = ixc25_ms.load(GOLDEN)
    return model(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"]).logits.asnumpy()


def _logits(model, golden, mode="base"):
    return model(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"],
                 infer_mode=mode).logits.asnumpy()


# ------------------------------------------------------------------------------------------ host round trip
def test_quantize_dequantize_round_trip():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2100, 37)) * rng.uniform(0.01, 3, (2100, 1))).astype(np.float32)  # > ROW_BLOCK rows
    w[5] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2100,)
    assert q.min() >= -127 and scale[5] == 0 and not q[5].any()
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-7)
    rows = np.arange(2100) != 5
    assert (np.abs(q[rows]).max(1) == 127).all()  # each row's largest weight takes the extreme code
    d = dequantize_int8(q, scale)
    assert (np.abs(d - w) <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    np.testing.assert_array_equal(quantize_int8(d)[0], q)  # dequantised weights quantise to the same codes
    # bf16 bits quantise as their exact fp32 values
    bits = f32_to_bf16(w)
    qb, sb = quantize_int8(bits, "BF16")
    q2, s2 = quantize_int8(bf16_to_f32(bits))
    np.testing.assert_array_equal(qb, q2)
    np.testing.assert_array_equal(sb, s2)
    w[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        quantize_int8(w)


def test_to_float16_counts_inexact_and_refuses_overflow():
    bits = f32_to_bf16(np.array([0.5, -1.25e-2, 3.0e-3, 1e-6], np.float32))
    h, inexact = to_float16(bits, "BF16")
    np.testing.assert_array_equal(h.astype(np.float32)[:3], bf16_to_f32(bits)[:3])  # bf16 -> fp16 exact
    assert inexact == 1  # 1e-6 is an fp16 subnormal: rounded
    with pytest.raises(ValueError, match="float16 range"):
        to_float16(np.array([7e4], np.float32))


# ------------------------------------------------------------------------------------------ kernels
@pytest.fixture(scope="module")
def kernels():
    k = cpu_quant_kernels(ms.float32, True)
    assert k is not None
    return k


def test_pack_rows_layout_and_round_trip():
    """Element (8b + r, 16c + j) of the codes sits at b*8*K + c*128 + r*16 + j of the packed buffer."""
    q = np.random.default_rng(1).integers(-127, 128, (24, 48)).astype(np.int8)
    p = pack_rows(q)
    assert p.shape == q.shape and p.dtype == np.int8
    flat = p.reshape(-1)
    for (row, col) in [(0, 0), (3, 17), (8, 0), (23, 47), (13, 33)]:
        b, r, c, j = row // 8, row % 8, col // 16, col % 16
        assert flat[b * 8 * 48 + c * 128 + r * 16 + j] == q[row, col]
    np.testing.assert_array_equal(unpack_rows(p), q)
    assert not packable(20, 48) and not packable(24, 40)
    with pytest.raises(ValueError, match="multiple"):
        pack_rows(q[:20])


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 37, 19), (GEMV_MAX_ROWS, 1040, 259), (1, 1040, 264),
                                   (5, 1040, 264), (GEMV_MAX_ROWS, 96, 8)])
def test_int8_and_fp16_matvec_against_numpy(kernels, m, k, n):
    rng = np.random.default_rng(m + k + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, scale = quantize_int8(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = (x.astype(np.float64) @ q.T.astype(np.float64)) * scale.astype(np.float64)
    y = kernels.int8_linear(Tensor(x), Tensor(q), Tensor(scale)).asnumpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    h = w.astype(np.float16)
    ref16 = x.astype(np.float64) @ h.T.astype(np.float64)
    y16 = kernels.f16_linear(Tensor(x), Tensor(h)).asnumpy()
    np.testing.assert_allclose(y16, ref16, rtol=1e-5, atol=1e-5 * np.abs(ref16).max())
    # the prefill path's dequantisation: one fp32 product per weight, exactly numpy's
    np.testing.assert_array_equal(kernels.int8_dequant(Tensor(q), Tensor(scale)).asnumpy(), dequantize_int8(q, scale))
    if packable(n, k):  # the packed decode layout: same products, same dequantised weight
        qp = Tensor(pack_rows(q))
        yp = kernels.int8_linear_packed(Tensor(x), qp, Tensor(scale)).asnumpy()
        np.testing.assert_allclose(yp, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(kernels.int8_dequant_packed(qp, Tensor(scale)).asnumpy(),
                                      dequantize_int8(q, scale))


@pytest.mark.parametrize("m", [1, GEMV_MAX_ROWS + 5])
def test_matmul_cells_every_path(kernels, m):
    """Int8Matmul / F16Matmul: the mat-vec kernel (rows <= GEMV_MAX_ROWS), dequantise + MatMul (more rows) and
    the portable ops (no kernels) agree with numpy."""
    rng = np.random.default_rng(m)
    q, scale = quantize_int8(rng.standard_normal((70, 33)).astype(np.float32))
    x = rng.standard_normal((m, 33)).astype(np.float32)
    ref = dequantize_int8(q, scale).astype(np.float64).T
    ref = x.astype(np.float64) @ ref
    for cell in (Int8Matmul(kernels), Int8Matmul(None)):
        y = cell(Tensor(x), Tensor(q), Tensor(scale)).asnumpy()
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    qp, sp = quantize_int8(rng.standard_normal((72, 48)).astype(np.float32))  # packable: the packed cell
    xp = rng.standard_normal((m, 48)).astype(np.float32)
    refp = xp.astype(np.float64) @ dequantize_int8(qp, sp).astype(np.float64).T
    yp = Int8Matmul(kernels, packed=True)(Tensor(xp), Tensor(pack_rows(qp)), Tensor(sp)).asnumpy()
    np.testing.assert_allclose(yp, refp, rtol=1e-5, atol=1e-5 * np.abs(refp).max())
    h = rng.standard_normal((70, 33)).astype(np.float16)
    ref16 = x.astype(np.float64) @ h.T.astype(np.float64)
    for cell in (F16Matmul(kernels), F16Matmul(None)):
        np.testing.assert_allclose(cell(Tensor(x), Tensor(h), None).asnumpy(), ref16, rtol=1e-5,
                                   atol=1e-5 * np.abs(ref16).max())


# ------------------------------------------------------------------------------------------ golden case
def test_int8_golden_logits_within_two_percent(golden, fp32_logits):
    model, _ = ixc25_ms.load(GOLDEN, quantize="int8")
    rep = model.load_report
    assert rep["mode"] == "int8" and rep["quantized"] == 2 * 5 + 1  # 2 layers x 5 linears + the output head
    dts = {k: p.dtype for k, p in model.parameters_and_names()}
    assert dts["model.layers.0.attention.wqkv.weight"] == ms.int8 and dts["output.weight"] == ms.int8
    assert dts["model.layers.1.feed_forward.w2.weight_scale"] == ms.float32
    assert dts["model.layers.0.attention.wo.Plora_A.weight"] == ms.float16
    assert dts["vision_proj.0.weight"] == ms.float32 and dts["model.norm.weight"] == ms.float32
    # every int8 weight of the tiny config is packable: held in the mat-vec's layout, the codes of the source
    assert len(model.packed_int8) == 11
    src = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    w2 = dict(model.parameters_and_names())["model.layers.0.feed_forward.w2.weight"].asnumpy()
    np.testing.assert_array_equal(unpack_rows(w2), quantize_int8(src.read("model.layers.0.feed_forward.w2.weight"))[0])
    lq = _logits(model, golden)
    err = relative_error(lq, fp32_logits)
    print(f"int8 golden logits: relative Frobenius error {err:.4f}")
    assert err <= 0.02
    # greedy ids agree wherever fp32's top-2 margin is clear (> 1 % of the row's logit range: 85 % of positions)
    f, q = fp32_logits[0], lq[0]
    s = np.sort(f, -1)
    clear = (s[:, -1] - s[:, -2]) > 0.01 * (s[:, -1] - s[:, 0])
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(q[clear].argmax(-1), f[clear].argmax(-1))


@pytest.mark.parametrize("use_jit", [False, True], ids=["pynative", "jit"])
def test_int8_greedy_ids_equal_official(golden, use_jit):
    model, _ = ixc25_ms.load(GOLDEN, quantize="int8", use_jit=use_jit)
    gen = CASE["generate"]
    ids = model.generate(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"],
                         max_new_tokens=gen["max_new_tokens"], do_sample=False,
                         repetition_penalty=gen["repetition_penalty"], eos_token_id=gen["eos_token_id"])
    assert ids[0].tolist() == CASE["new_token_ids"]


def test_portable_int8_path_equals_kernels(golden, monkeypatch):
    """IXC25_CPU_KERNELS=0: the portable ops (Cast, MatMul, scale) give the kernels' logits."""
    a, _ = ixc25_ms.load(GOLDEN, quantize="int8")
    monkeypatch.setenv("IXC25_CPU_KERNELS", "0")
    b, _ = ixc25_ms.load(GOLDEN, quantize="int8")
    assert b.model.layers[0].attention.wqkv.weight_matmul.kernels is None
    assert_close(_logits(b, golden), _logits(a, golden), "fp32", "portable int8 vs kernels")


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "int8"
    assert convert_main(["--src", GOLDEN, "--dst", str(d), "--quantize", "int8", "--quiet"]) == 0
    return d


def test_converter_quantize_writes_codes_and_scales(quantized_dir, capsys):
    rec = json.load(open(quantized_dir / "conversion.json"))
    assert rec["quantize"] == "int8" and "I8" in rec["output_dtypes"]
    st = SafetensorsFile(str(quantized_dir / "ms_model-00001-of-00001.safetensors"))
    assert st.dtype_tag("model.layers.1.attention.wqkv.weight") == "I8"
    assert st.shape("model.layers.1.attention.wqkv.weight_scale") == (st.shape("model.layers.1.attention.wqkv.weight")[0],)
    assert st.dtype_tag("output.weight") == "I8" and st.dtype_tag("model.layers.1.attention.wqkv.Plora_A.weight") == "F32"
    # the stored codes are quantize_int8 of the source weight
    src = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors"))
    q, s = quantize_int8(src.read("model.layers.0.feed_forward.w2.weight"))
    np.testing.assert_array_equal(st.read_raw("model.layers.0.feed_forward.w2.weight"), q)
    np.testing.assert_array_equal(st.read_raw("model.layers.0.feed_forward.w2.weight_scale"), s)
    r = next(t for t in rec["tensors"] if t["target"] == "output.weight")
    assert r["dtype"] == "I8" and r["scale"]["target"] == "output.weight_scale"
    # what cannot be done says so in one line
    back = quantized_dir.parent / "back"
    assert convert_main(["--src", str(quantized_dir), "--dst", str(back), "--to-torch", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "int8" in err and err.count("\n") == 1 and not back.exists()
    with pytest.raises(SystemExit):
        convert_main(["--src", GOLDEN, "--dst", str(back), "--quantize", "int8", "--format", "ckpt"])


def test_prequantized_checkpoint_loads_like_on_the_fly(quantized_dir, golden):
    a, _ = ixc25_ms.load(GOLDEN, quantize="int8")
    b, _ = ixc25_ms.load(str(quantized_dir))  # quantize=None: as stored, i.e. int8
    assert b.load_report["stored"] == "int8" and b.load_report["prequantized"] == 11
    assert b.load_report["quantized"] == 0
    pa, pb = dict(a.parameters_and_names()), dict(b.parameters_and_names())
    assert set(pa) == set(pb)
    for k, p in pa.items():
        assert p.dtype == pb[k].dtype, k
        np.testing.assert_array_equal(p.asnumpy(), pb[k].asnumpy(), err_msg=k)
    np.testing.assert_array_equal(_logits(a, golden), _logits(b, golden))
    with pytest.raises(ixc25_ms.CheckpointError, match="pre-quantised int8"):
        ixc25_ms.load(str(quantized_dir), quantize="fp16")


# ------------------------------------------------------------------------------------------ lazy LoRAs
LAZY = ("lora_sft", "lora_dpo", "lora_web")


def _lazy_params(model):
    return [k for k, _ in model.parameters_and_names() if any(f".{b}_" in k for b in LAZY)]


@pytest.mark.parametrize("quantize", ["int8", None])
def test_write_web_loras_load_on_first_use(golden, quantize):
    model, _ = ixc25_ms.load(GOLDEN, quantize=quantize)  # lazy by default, float loads too
    assert _lazy_params(model) == [] and model.model.layers[0].attention.wqkv.lora_web_A is None
    _logits(model, golden)  # base mode loads nothing
    assert _lazy_params(model) == []
    for mode in ("write", "web"):
        got = _logits(model, golden, mode)
        assert mode in model.lazy_loras.seconds
        want = golden[f"logits_infer_{mode}"]
        if quantize is None:
            assert_close(got, want, "fp32", f"lazy {mode} LoRAs")
        else:
            assert relative_error(got, want) <= 0.02
    names = _lazy_params(model)
    assert len(names) == 2 * 5 * 6 and "model.layers.1.feed_forward.w3.lora_dpo_B.weight" in names
    if quantize:
        assert {p.dtype for k, p in model.parameters_and_names() if k in names} == {ms.float16}


def test_every_tensor_in_memory_when_asked():
    """lazy_loras=False (the trainer's load: it saves every tensor back) holds the write/web LoRAs from the start."""
    model, _ = ixc25_ms.load(GOLDEN, lazy_loras=False)
    assert model.lazy_loras is None and len(_lazy_params(model)) == 2 * 5 * 6
    key = "model.layers.1.feed_forward.w3.lora_dpo_B.weight"
    want = SafetensorsFile(os.path.join(GOLDEN, "model.safetensors")).read(key)
    got = dict(model.parameters_and_names())[key].asnumpy()
    np.testing.assert_array_equal(got, want)


def test_memory_lean_path_equals_compiled(golden, monkeypatch):
    """Quantised models whose dequantised weights pass LEAN_DEQUANT_BYTES (the 7B) prefill eagerly and run the
    tower eagerly one view at a time: the same image embeddings and greedy ids as the compiled path."""
    import ixc25_ms.language.model as lm
    model, _ = ixc25_ms.load(GOLDEN, quantize="int8", use_jit=True)
    assert not model.memory_lean()
    pv = golden["pixel_values"]
    emb_jit = model.img2emb(pv).asnumpy()
    gen = CASE["generate"]
    kw = dict(max_new_tokens=gen["max_new_tokens"], do_sample=False, repetition_penalty=gen["repetition_penalty"],
              eos_token_id=gen["eos_token_id"])
    ids_jit = model.generate(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"], **kw)
    monkeypatch.setattr(lm, "LEAN_DEQUANT_BYTES", 0)
    assert model.memory_lean()
    calls = []
    real = type(model.vit).construct
    monkeypatch.setattr(type(model.vit), "construct", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    monkeypatch.setattr(type(model), "_prefill_jit", lambda *a: pytest.fail("compiled prefill in the lean path"))
    emb = model.img2emb(pv).asnumpy()
    assert calls == [1, 1, 1]  # global view + 2 crops, one at a time, eagerly
    np.testing.assert_allclose(emb, emb_jit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb, golden["img_embeds"], rtol=1e-4, atol=1e-5)
    ids = model.generate(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"], **kw)
    assert ids[0].tolist() == ids_jit[0].tolist() == CASE["new_token_ids"]


def test_memory_lean_model_stores_its_tower_fp16_and_partial_lora_int8(golden, monkeypatch):
    """A model big enough for the lean path (the 7B) also stores its ViT and projector linears fp16 (0.6 GB less
    at ViT-L) and its partial LoRA int8 (0.6 GB less at r 256): the image embeddings stay within fp16 rounding
    of the official ones and greedy ids are unchanged; smaller quantised models keep the tower in fp32 and the
    partial LoRA fp16."""
    import mindspore as ms
    import ixc25_ms.language.model as lm
    from ixc25_ms.quantize.prepare import plora_cells, vision_linears
    small, _ = ixc25_ms.load(GOLDEN, quantize="int8", use_jit=True)
    assert {c.weight.dtype for _, c in vision_linears(small)} == {ms.float32}
    assert {c.Plora_A.weight.dtype for _, c in plora_cells(small)} == {ms.float16}
    monkeypatch.setattr(lm, "LEAN_DEQUANT_BYTES", 0)
    model, _ = ixc25_ms.load(GOLDEN, quantize="int8", use_jit=True)
    lin = vision_linears(model)
    assert lin and {c.weight.dtype for _, c in lin} == {ms.float16}
    assert any(n.startswith("vision_proj.") for n, _ in lin) and any(n.startswith("vit.") for n, _ in lin)
    pl = [b for _, c in plora_cells(model) for b in (c.Plora_A, c.Plora_B)]
    assert pl and {b.weight.dtype for b in pl} == {ms.int8} and all(b.weight_scale is not None for b in pl)
    emb = model.img2emb(golden["pixel_values"]).asnumpy()
    ref = golden["img_embeds"]
    assert np.linalg.norm(emb - ref) / np.linalg.norm(ref) < 2e-3
    gen = CASE["generate"]
    ids = model.generate(inputs_embeds=Tensor(golden["inputs_embeds"]), im_mask=golden["im_mask"],
                         max_new_tokens=gen["max_new_tokens"], do_sample=False,
                         repetition_penalty=gen["repetition_penalty"], eos_token_id=gen["eos_token_id"])
    assert ids[0].tolist() == CASE["new_token_ids"]


_THREADS_SCRIPT = r"""
import sys, numpy as np, mindspore as ms
from mindspore import Tensor
from ixc25_ms import cpu_kernels as ck
from ixc25_ms.quantize import pack_rows, quantize_int8
from ixc25_ms.quantize.kernels import cpu_quant_kernels
rng = np.random.default_rng(7)
q, s = quantize_int8(rng.standard_normal((1024, 512)).astype(np.float32))
x = rng.standard_normal((2, 512)).astype(np.float32)
y = cpu_quant_kernels(ms.float32, True).int8_linear_packed(Tensor(x), Tensor(pack_rows(q)), Tensor(s)).asnumpy()
qa = rng.standard_normal((8, 4, 64)).astype(np.float32)
k, v = (rng.standard_normal((8, 300, 64)).astype(np.float32) for _ in range(2))
m = np.zeros((2, 1, 1, 300), np.float32)
a = ck.DecodeKernels(ck.build_library(), kv_heads=4, groups=4).decode_attn(Tensor(qa), Tensor(k), Tensor(v), Tensor(m))
np.savez(sys.argv[1], y=y, a=a.asnumpy())
"""


def test_decode_threads_knob_changes_no_result(tmp_path):
    """IXC25_DECODE_THREADS (threads of the decode mat-vecs and attention) splits rows and heads, never a sum:
    the results are bit-identical for 1 and 2 threads (each run in its own process: the pool reads it once)."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    out = {}
    for n in ("1", "2"):
        env = dict(os.environ, IXC25_DECODE_THREADS=n, IXC25_KERNEL_THREADS="2", GLOG_v="3")
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"t{n}.npz")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[n] = dict(np.load(tmp_path / f"t{n}.npz"))
    for key in ("y", "a"):
        assert np.isfinite(out["1"][key]).all() and np.abs(out["1"][key]).max() > 0
        np.testing.assert_array_equal(out["1"][key], out["2"][key], err_msg=key)


@pytest.mark.parametrize("use_jit", [False, True])
def test_fused_int8_decode_layers_equal_the_separate_kernels(use_jit):
    """An int8 model decodes each layer in three fused kernels (DecoderLayer.decode_int8); the same steps through
    the separate kernels (int8_block off) give bit-identical logits: same arithmetic, same order. Left-padded
    batch of 2, 5 greedy steps."""
    model, _ = ixc25_ms.load(GOLDEN, quantize="int8", use_jit=use_jit)
    layers = model.model.layers
    assert all(layer.int8_block for layer in layers), "the fused int8 decode path is not in use"
    rng = np.random.default_rng(0)
    emb = Tensor((rng.standard_normal((2, 7, model.cfg.hidden_size)) * 0.1).astype(np.float32))
    am = np.ones((2, 7), np.int64)
    am[1, :2] = 0
    out = {}
    for fused in (True, False):
        for layer in layers:
            layer.int8_block = fused
        if use_jit:  # a fresh compiled step for each path (the flag is a constant of the graph)
            model._decode_jit = ms.jit(model._decode_body)
        _, _, cache = model.prefill(emb, np.zeros((2, 7), bool), am, "base", cap=16, last_only=True)
        nxt, steps = np.array([[3], [5]]), []
        for _ in range(5):
            logits, _ = model.decode(nxt, cache)
            steps.append(logits.asnumpy())
            nxt = steps[-1][:, -1].argmax(-1)[:, None]
        out[fused] = np.stack(steps)
    assert np.abs(out[False]).max() > 0
    np.testing.assert_array_equal(out[True], out[False])

"""Training parity rows: ixc25-finetune's step (MindSpore) vs our PyTorch reference — labels, loss, every gradient."""
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from PIL import Image, ImageDraw

import ixc25_ms
from ixc25_ms.config import IXCConfig
from ixc25_ms.train.args import FinetuneArgs
from ixc25_ms.train.batch import Collator
from ixc25_ms.train.data import parse_item
from ixc25_ms.fused_attention import use_fused_attention
from ixc25_ms.train.forward import TrainForward, forward_inputs, vit_is_frozen
from ixc25_ms.train.prepare import prepare
from ixc25_ms.weights.layout import load_state_dict
from parity_tests.helpers import HERE
from parity_tests.reference.train import TrainFlags, ref_train_step
from parity_tests.tolerance import TOLERANCE

DATA = os.path.join(HERE, "..", "tests", "data", "official-train")
TOKENIZER = os.path.join(HERE, "..", "tests", "data", "internlm2-tokenizer.model")
Q1, A1 = "What is drawn here? <ImageHere>", "A red box on the left and a blue disc."
TURNS = [("human", "Image1: <ImageHere>; Image2: <ImageHere>. Compare them."),
         ("bot", "The first is wide, the second tall."), ("user", "Which one has more blue?"),
         ("assistant", "The second one, by far."), ("human", "Thanks!"), ("gpt", "You are welcome.")]


def _item(turns, images=None, i=0):
    it = {"id": i, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if images is not None:
        it["image"] = images
    return it


CASES = {  # name: (items, flags)
    "text_only": ([_item([("human", "Hello there."), ("bot", "Hi! How can I help?")])], {}),
    "one_image": ([_item([("human", "Describe the picture."), ("bot", A1)], "a.png")], dict(fix_vit=False)),
    "images_with_placeholders_several_turns": ([_item(TURNS, ["a.png", "b.png"])], dict(fix_vit=False)),
    "batch_of_two_padded": ([_item([("human", Q1), ("bot", A1)], ["b.png"], 0),
                             _item([("human", "Size?"), ("bot", "Small."), ("human", "Colour?"), ("bot", "Red.")],
                                   "a.png", 1)], {}),
    "truncation_inside_a_user_turn": ([_item(TURNS, ["a.png", "b.png"])], dict(max_length="cut")),
    "text_batch_padding_quirk": ([_item([("human", "Hi."), ("bot", "Hello.")], None, 0),
                                  _item([("human", "Name three colours."), ("bot", "Red, green and blue.")], None, 1)],
                                 {}),
    "fix_vit_fix_sampler": ([_item([("human", Q1), ("bot", A1)], "b.png")], dict(fix_vit=True, fix_sampler=True)),
    "freeze_llm": ([_item([("human", Q1), ("bot", A1)], "a.png")], dict(fix_vit=False, freeze_llm=True)),
    "lora": ([_item([("human", Q1), ("bot", A1)], "a.png")],
             dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)),
    "backbone_lora": ([_item([("human", Q1), ("bot", A1)], "b.png")],
                      dict(use_backbone_lora=2, lora_dropout=0.0, fix_sampler=True)),
}
JIT_CASES = ("one_image", "lora")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The golden model folder (tiny config, real tokenizer) and two drawn pictures of different grids."""
    d = tmp_path_factory.mktemp("train_parity")
    model = d / "model"
    shutil.copytree(DATA, model)
    shutil.copyfile(TOKENIZER, model / "tokenizer.model")
    for name, size, box in (("a.png", (330, 220), (20, 30, 150, 160)), ("b.png", (180, 600), (40, 300, 160, 560))):
        im = Image.new("RGB", size, (240, 236, 228))
        dr = ImageDraw.Draw(im)
        dr.rectangle(box, fill=(200, 30, 40))
        dr.ellipse((size[0] // 2, 10, size[0] - 10, size[0] // 2), fill=(30, 60, 200))
        im.save(d / name)
    return d


def _flags(flags) -> dict:
    base = dict(hd_num=18, max_length=4096, fix_vit=True, fix_sampler=False, use_lora=False, plora_dropout=0.0)
    return dict(base, **flags)


def ms_step(workdir, items, flags, use_jit=False, lora_b_seed=5, fused_attention=True):
    """Our side: the model loaded as ixc25-finetune loads it, the flags applied, one micro-batch's loss/grads.
    fused_attention: the fused CPU attention, as the trainer uses it (False: the portable ops)."""
    model, tok = ixc25_ms.load(str(workdir / "model"), lazy_loras=False)  # every tensor, as the trainer loads
    args = FinetuneArgs(model_name_or_path=str(workdir / "model"), output_dir="unused", seed=0, **_flags(flags))
    t = prepare(model, args)
    assert use_fused_attention(model, None if fused_attention else False) == fused_attention
    rng = np.random.default_rng(lora_b_seed)
    lora = {}  # nonzero B (A is random already), so LoRA gradients are all nonzero; the reference gets the same
    for n, p in model.parameters_and_names():
        if ".lora_B." in n:
            p.set_data(ms.Tensor((rng.standard_normal(p.shape) * 0.05).astype(np.float32)))
        if ".lora_A." in n or ".lora_B." in n:
            lora[n] = p.asnumpy()
    col = Collator(tok, args.max_length, args.hd_num, model.vit.geometry)
    samples = [parse_item(it, "items", k) for k, it in enumerate(items)]
    batch = col(samples)
    model.set_train(True)
    frozen = vit_is_frozen(t.names)  # as the trainer: a frozen ViT runs outside the gradient
    grad = ms.value_and_grad(TrainForward(model, col.geo, vit_frozen=frozen), None, t.params)
    loss, grads = (ms.jit(grad) if use_jit else grad)(*forward_inputs(model, batch, vit_frozen=frozen,
                                                                       use_jit=use_jit))
    active = t.active(batch.views is not None)
    return dict(labels=batch.labels, loss=float(loss.asnumpy()), lora=lora,
                grads={n: (g.asnumpy() if a else None) for n, g, a in zip(t.names, grads, active)}), tok


def ref_step(workdir, tok, items, flags, lora):
    weights = load_state_dict(str(workdir / "model"))
    weights.update(lora)
    cfg = IXCConfig.from_file(str(workdir / "model"))
    fl = _flags(flags)
    tf = TrainFlags(**{k: v for k, v in fl.items() if k in TrainFlags.__dataclass_fields__})
    return ref_train_step(cfg, weights, tok, items, str(workdir), tf)


def _compare(ours, ref, name):
    assert ours["labels"].shape == ref["labels"].shape, name
    np.testing.assert_array_equal(ours["labels"], ref["labels"], err_msg=f"{name}: labels")
    assert abs(ours["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, ours["loss"], ref["loss"])
    assert set(ours["grads"]) == set(ref["trainable"]), f"{name}: trainable sets differ"
    tol = TOLERANCE["fp32"]["rel_fro"]
    for n, r in ref["grads"].items():
        g = ours["grads"][n]
        if r is None:  # not in the reference's graph: the optimizer must skip it on our side too
            assert g is None, f"{name}: {n} is outside the official graph but active here"
            continue
        assert g is not None, f"{name}: {n} in the graph officially, skipped here"
        nr = np.linalg.norm(r)
        if nr < 1e-7:  # zero in exact arithmetic (e.g. the ViT k_proj biases): rounding noise on both sides
            assert np.abs(g).max() < 1e-6, (name, n, np.abs(g).max())
            continue
        rel = np.linalg.norm(g.astype(np.float64) - r) / nr
        assert rel <= tol, f"{name}: {n}: gradient relative Frobenius {rel:.2e} > {tol}"


def _cut_inside_second_user_turn(workdir, items) -> int:
    """A max_length that ends the prompt 4 tokens into the second user turn (after the first answer's EOT)."""
    from ixc25_ms.tokenizer import InternLM2Tokenizer
    tok = InternLM2Tokenizer(TOKENIZER)
    col = Collator(tok, 100000, 18)
    ids, _, _ = col.stream(parse_item(items[0], "items", 0))
    eot = np.flatnonzero(ids == tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]"))
    return int(eot[1]) + 5


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_parity(workdir, monkeypatch, case):
    monkeypatch.chdir(workdir)  # image paths are relative to the working directory, as the official
    items, flags = CASES[case]
    if flags.get("max_length") == "cut":
        flags = dict(flags, max_length=_cut_inside_second_user_turn(workdir, items))
    ours, tok = ms_step(workdir, items, flags)
    ref = ref_step(workdir, tok, items, flags, ours["lora"])
    if case == "truncation_inside_a_user_turn":  # the cut user turn is masked; the first answer and its EOT train
        lab = ours["labels"][0]
        assert len(lab) == flags["max_length"] and (lab[-4:] == -100).all()
        assert lab[-5] == tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]") and lab[-6] != -100
    if case == "text_batch_padding_quirk":  # the shorter row trains its first pad (the EOS id), as the official
        short = int((ours["labels"][0] != -100).sum())
        assert ours["labels"][0, short + 2:].tolist().count(2) <= 1
    _compare(ours, ref, case)


@pytest.mark.parametrize("case", JIT_CASES)
def test_train_step_parity_jit(workdir, monkeypatch, case):
    monkeypatch.chdir(workdir)
    items, flags = CASES[case]
    ours, tok = ms_step(workdir, items, flags, use_jit=True)
    _compare(ours, ref_step(workdir, tok, items, flags, ours["lora"]), case + " (jit)")


@pytest.mark.parametrize("use_jit", [False, True])
def test_train_step_parity_portable_attention(workdir, monkeypatch, use_jit):
    """The portable attention ops (Ascend, GPU, fp16, or IXC25_CPU_KERNELS=0) give the same gradients."""
    monkeypatch.chdir(workdir)
    items, flags = CASES["images_with_placeholders_several_turns"]
    ours, tok = ms_step(workdir, items, flags, use_jit=use_jit, fused_attention=False)
    _compare(ours, ref_step(workdir, tok, items, flags, ours["lora"]), "portable attention")

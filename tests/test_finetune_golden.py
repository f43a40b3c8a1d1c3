"""`ixc25-finetune` reproduces one official fine-tuning step: the golden case's command line, every gradient."""
import json
import os
import shutil

import numpy as np
import pytest

from ixc25_ms.weights.layout import load_state_dict
from ixc25_ms.weights.safetensors import SafetensorsFile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "official-train")
TOKENIZER = os.path.join(HERE, "data", "internlm2-tokenizer.model")
# the command line of tests/data/official-train (README of the golden case)
GOLDEN_ARGS = ("--model_name_or_path . --data_path data.txt --output_dir out --max_steps 1 --optim sgd "
               "--learning_rate 1000 --weight_decay 0 --max_grad_norm 0 --lr_scheduler_type constant --warmup_ratio 0 "
               "--per_device_train_batch_size 1 --gradient_accumulation_steps 1 --batch_size 1 --given_num False "
               "--hd_num 18 --max_length 4096 --fix_vit False --fix_sampler False --use_lora False --plora_dropout 0 "
               "--logging_steps 1 --seed 0").split()


def golden_workdir(dst) -> str:
    """A copy of the golden folder with the tokenizer beside the weights and data.txt listing data.json."""
    d = str(dst)
    shutil.copytree(DATA, d)
    shutil.copyfile(TOKENIZER, os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "data.txt"), "w") as f:
        f.write("data.json\n")
    return d


@pytest.mark.parametrize("jit,recompute", [(False, False), (True, False), (True, True)],
                         ids=["pynative", "jit", "jit-gradient-checkpointing"])
def test_one_sgd_step_reproduces_official_gradients(tmp_path, monkeypatch, jit, recompute):
    from ixc25_ms.train.cli import main
    d = golden_workdir(tmp_path / "case")
    monkeypatch.chdir(d)
    assert main(GOLDEN_ARGS + ["--quiet", "--torch_compile", str(jit), "--gradient_checkpointing", str(recompute)]) == 0
    before = load_state_dict(d)
    after = load_state_dict(os.path.join(d, "out"))
    st = SafetensorsFile(os.path.join(d, "expected.safetensors"))
    exp = {k: st.read_raw(k) for k in st.keys()}
    with open(os.path.join(d, "case.json")) as f:
        case = json.load(f)
    assert set(after) == set(before), "the output is an official-layout checkpoint of the same tensors"
    checked = 0
    for k in before:
        g = (before[k].astype(np.float64) - after[k].astype(np.float64)) / 1000.0
        if k + "@rows" in exp:  # vocab matrices: the stored rows
            ref, got = exp[k + "@rows"], g[exp[k + "@row_ids"]]
        elif k in exp:
            ref, got = exp[k], g
        else:  # frozen (post_layernorm: replaced by Identity) or exactly zero officially
            assert not g.any(), f"{k}: changed, the official step leaves it"
            assert k in case["zero_grad"] or "post_layernorm" in k, k
            continue
        checked += 1
        if k.endswith("self_attn.k_proj.bias"):  # zero in exact arithmetic: both sides hold rounding noise
            assert np.abs(got).max() < 1e-7, k
            continue
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel <= 1e-4, f"{k}: gradient relative Frobenius error {rel:.2e}"
    assert checked + len(case["zero_grad"]) == case["trainable_tensors"] == 140
    with open(os.path.join(d, "out", "trainer_state.json")) as f:
        state = json.load(f)
    step1 = [h for h in state["log_history"] if h.get("step") == 1 and "loss" in h]
    assert len(step1) == 1 and abs(step1[0]["loss"] - case["loss"]) <= 1e-5 * case["loss"]

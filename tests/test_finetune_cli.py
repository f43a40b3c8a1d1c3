"""ixc25-finetune as a user runs it: flags, bad input, LoRA adapters and merge, resume after kill -9, a real run."""
import json
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

import ixc25_ms
from ixc25_ms.testing import TinyModelTester
from ixc25_ms.testing.finetune_data import example_finetune_data
from ixc25_ms.train.args import parse_args
from ixc25_ms.train.cli import main
from ixc25_ms.weights.layout import load_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny IXC2.5 with CLIP at 224 px (64 merged tokens per view: fast steps), the tiny tokenizer (vocab 400)
TINY = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000,
        "max_position_embeddings": 4096, "lora_r": 8, "lora_alpha": 8, "web_lora_r": 8, "max_length": 4096,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 224, "patch_size": 14}}


def tiny_model(d, seed=0) -> str:
    return TinyModelTester(TINY, seed=seed, init="bench").write_checkpoint(str(d))


BASE = ["--data_path", "data.txt", "--per_device_train_batch_size", "1", "--batch_size", "1", "--max_length", "1024",
        "--hd_num", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--quiet", "--seed", "3"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    return {"model": tiny_model(d / "model"), "root": example_finetune_data(d)}


def run(work, out, *extra, expect=0, capsys=None):
    rc = main(["--model_name_or_path", work["model"], "--output_dir", str(out)] + BASE + list(extra))
    assert rc == expect
    return rc


# ------------------------------------------------------------------------------------------ flags
def test_flags_parse_as_transformers(capsys):
    a = parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--fix_vit", "False", "--use_lora",
                    "--fix_sampler", "true", "--deepspeed", "ds.json", "--report_to", "none",
                    "--evaluation_strategy", "no", "--lora_target_modules", "attention.wqkv", "feed_forward.w2"])
    assert a.fix_vit is False and a.use_lora is True and a.fix_sampler is True
    assert a.lora_target_modules == ["attention.wqkv", "feed_forward.w2"]
    assert (a.per_device_train_batch_size, a.learning_rate, a.max_grad_norm, a.lr_scheduler_type) == (8, 5e-5, 1.0, "linear")
    out = capsys.readouterr().out
    assert "--deepspeed accepted" in out and "--report_to accepted" in out and "--evaluation_strategy accepted" in out
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--fix_vit", "maybe"])


def test_a_community_lora_command_line_parses(capsys):
    """A LoRA command line as IXC2.5 fine-tuning projects write it (the official flags plus transformers'
    evaluation and naming flags, some bare, some with '='): every flag parses, the training ones are read, the
    evaluation ones are accepted with a line saying that nothing is evaluated during training."""
    cmd = ("--model_name_or_path m --data_path data.txt --given_num True --bf16 True --fix_vit True --fix_sampler True "
           "--use_lora True --hd_num 18 --output_dir out --num_train_epochs 6 --batch_size 2 "
           "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 8 "
           "--eval_strategy steps --eval_steps 10 --load_best_model_at_end --save_strategy steps --save_steps 6 "
           "--save_total_limit 1 --overwrite_output_dir --learning_rate 1e-4 --weight_decay 0.1 --adam_beta2 0.95 "
           "--warmup_ratio 0.01 --lr_scheduler_type cosine --logging_steps 1 --report_to none --max_length 1024 "
           "--deepspeed ds_config_zero2.json --gradient_checkpointing True --run_name ixc --tf32 "
           "--ddp_find_unused_parameters=False").split()
    a = parse_args(cmd)
    assert (a.use_lora, a.fix_vit, a.hd_num, a.num_train_epochs, a.batch_size, a.gradient_accumulation_steps) == \
        (True, True, 18, 6, 2, 8)
    assert (a.save_strategy, a.save_steps, a.learning_rate, a.lr_scheduler_type, a.max_length) == \
        ("steps", 6, 1e-4, "cosine", 1024)
    out = capsys.readouterr().out
    for flag in ("--eval_strategy", "--eval_steps", "--load_best_model_at_end", "--run_name", "--tf32"):
        assert f"{flag} accepted: no" in out or f"{flag} accepted: reporting" in out, (flag, out)
    with pytest.raises(SystemExit):  # a flag neither transformers nor the official script has is still refused
        parse_args(cmd + ["--query_max_len", "4096"])


@pytest.mark.parametrize("flags", [["--learning_rate", "-0.0001"], ["--learning_rate", "nan"], ["--lora_dropout", "1"],
                                   ["--plora_dropout", "-0.1"], ["--use_lora", "--lora_r", "0"], ["--warmup_ratio", "2"],
                                   ["--lr_scheduler_type", "cosinus"], ["--optim", "adam"], ["--adam_beta2", "1.0"],
                                   ["--num_train_epochs", "0"], ["--use_backbone_lora", "-4"], ["--save_steps", "0"],
                                   ["--vit_layer_decay", "0"], ["--save_total_limit", "-1"],
                                   ["--learning_rate", "-1e-4"], ["--weight_decay", "-5E-2"]])
def test_out_of_range_flags_refused_at_parsing(capsys, flags):
    """Numbers out of range and unknown schedule or optimizer names end the run at parsing, in one line naming the
    flag and the value — not after the model and data have loaded (nor as a NaN step)."""
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--output_dir", "o"] + flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    got = err.rsplit("got ", 1)[-1].strip("'")
    assert err.startswith("ixc25-finetune: error:") and flags[-2] in err, err
    assert got == flags[-1] or float(got) == float(flags[-1]) or got == str(float(flags[-1])), err


def test_in_range_edge_values_still_parse():
    """What transformers and PEFT accept stays accepted: epochs unread under --max_steps, --lora_r 0 without
    --use_lora, --save_steps 0 with no step saving, --save_total_limit 0 (keep all), a rate of 0."""
    a = parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--num_train_epochs", "0", "--max_steps", "3",
                    "--lora_r", "0", "--save_strategy", "no", "--save_steps", "0", "--save_total_limit", "0",
                    "--learning_rate", "0", "--warmup_ratio", "1", "--lora_dropout", "0"])
    assert (a.max_steps, a.lora_r, a.save_steps, a.save_total_limit, a.learning_rate) == (3, 0, 0, 0, 0)


# ------------------------------------------------------------------------------------------ bad input
def _bad_data(root, kind):
    p = os.path.join(root, f"bad_{kind}.json")
    items = {"no_conversations": [{"id": "x7", "image": "data/images/img0.png"}],
             "roles": [{"id": "x8", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
             "missing_image": [{"id": "x9", "image": "data/images/none.png",
                                "conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
             "too_many_tags": [{"id": "x10", "image": "data/images/img0.png", "conversations": [
                 {"from": "human", "value": "<ImageHere> and <ImageHere>"}, {"from": "bot", "value": "b"}]}]}
    if kind == "malformed":
        with open(p, "w") as f:
            f.write('[{"id": 1,\n  "conversations": [}]')
    else:
        with open(p, "w") as f:
            json.dump(items[kind], f)
    return p


@pytest.mark.parametrize("kind,needles", [
    ("missing_file", ["nope.json", "no such"]),
    ("malformed", ["bad_malformed.json", "line 2 column"]),
    ("no_conversations", ["bad_no_conversations.json", "item 0", "x7", "conversations"]),
    ("roles", ["bad_roles.json", "x8", "conversations[1]", "alternate"]),
    ("missing_image", ["bad_missing_image.json", "x9", "none.png", "not found"]),
    ("too_many_tags", ["bad_too_many_tags.json", "x10", "2 <ImageHere>", "1 image"]),
])
def test_bad_data_is_one_clear_line(work, tmp_path, monkeypatch, capsys, kind, needles):
    monkeypatch.chdir(work["root"])
    path = "nope.json" if kind == "missing_file" else _bad_data(work["root"], kind)
    out = tmp_path / "out"
    rc = main(["--model_name_or_path", work["model"], "--output_dir", str(out), "--data_path", path, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and err.startswith("ixc25-finetune: error:"), err
    for n in needles:
        assert n in err, (n, err)
    assert not os.listdir(out), "nothing is written on bad input"


def test_bad_flags_and_output_dir(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(work["root"])
    out = tmp_path / "o"
    assert main(["--model_name_or_path", work["model"], "--output_dir", str(out), "--data_path", "data.txt",
                 "--use_lora", "--lora_target_modules", "attention.wqx", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--lora_target_modules" in err and "attention.wqx" in err and "matches no" in err
    (out / "keep.txt").write_text("x")
    assert main(["--model_name_or_path", work["model"], "--output_dir", str(out), "--data_path", "data.txt"]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------ runs
def _log(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)


def test_short_full_run_learns_and_logs_like_transformers(work, tmp_path, monkeypatch):
    """Full fine-tuning (ViT too) on the look-alike example data: the loss falls; the output is an official-layout
    checkpoint that ixc25_ms.load reads; trainer_state.json has transformers' log_history entries."""
    monkeypatch.chdir(work["root"])
    out = tmp_path / "full"
    run(work, out, "--fix_vit", "False", "--max_steps", "24", "--gradient_accumulation_steps", "2",
        "--warmup_steps", "2", "--lr_scheduler_type", "cosine", "--save_strategy", "no")
    hist = [h for h in _log(out)["log_history"] if "loss" in h]
    assert [h["step"] for h in hist] == list(range(1, 25))
    assert all({"loss", "learning_rate", "grad_norm", "epoch", "step"} <= set(h) for h in hist)
    first, last = np.mean([h["loss"] for h in hist[:4]]), np.mean([h["loss"] for h in hist[-4:]])
    assert last < 0.8 * first, (first, last)  # from ln(400) ~ 6.0 at random init
    model, tok = ixc25_ms.load(str(out))
    assert set(load_state_dict(str(out))) == set(load_state_dict(work["model"]))
    assert os.path.isfile(out / "tokenizer.model") and os.path.isfile(out / "config.json")


def test_compiled_text_only_step_equals_the_eager_one(work, tmp_path, monkeypatch):
    """--torch_compile True runs text-only micro-batches compiled too (a graph of their own, None views a constant
    in it; they used to run eagerly, ~5x slower): one SGD step over two text-only items of different lengths (so
    one is padded) moves every weight as the eager step does, to the fp32 table (relative Frobenius <= 1e-5)."""
    monkeypatch.chdir(work["root"])
    with open("text.txt", "w") as f:
        f.write("data/only_text_example.json 1\n")
    outs = {}
    for jit in (False, True):
        outs[jit] = tmp_path / f"jit{jit}"
        main(["--model_name_or_path", work["model"], "--output_dir", str(outs[jit])] + BASE + [
            "--data_path", "text.txt", "--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0",
            "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
            "--weight_decay", "0", "--max_grad_norm", "0", "--save_strategy", "no", "--torch_compile", str(jit)])
    init, eager, comp = (load_state_dict(str(p)) for p in (work["model"], outs[False], outs[True]))
    moved = 0
    for k in init:
        d_eager, d_comp = eager[k] - init[k], comp[k] - init[k]
        assert np.abs(d_eager).max() > 0 or not np.abs(d_comp).any(), k
        if np.abs(d_eager).max() > 0:
            moved += 1
            assert np.linalg.norm(d_comp - d_eager) <= 1e-5 * np.linalg.norm(d_eager), k
    assert moved == 17  # every language-model tensor but the partial LoRAs (2 layers x 7, embeddings, norm, head)
    assert all(h["loss"] > 0 for h in _log(outs[True])["log_history"] if "loss" in h)


def _logits(model, tok, image, text="What is in the picture?"):
    model.set_train(False)
    inputs, im, _ = model.interleav_wrap_chat(text, [image])
    return model(inputs_embeds=inputs["inputs_embeds"], im_mask=im).logits.asnumpy()


def test_lora_adapter_load_merge_and_reference(work, tmp_path, monkeypatch):
    """A LoRA run writes a PEFT adapter; base + adapter == the merged checkpoint (<= 1e-5); the merged official-
    layout weights in our PyTorch reference give the same logits."""
    from ixc25_ms.train.merge import main as merge_main
    monkeypatch.chdir(work["root"])
    out = tmp_path / "lora"
    run(work, out, "--use_lora", "--lora_r", "4", "--lora_alpha", "16", "--max_steps", "6", "--learning_rate", "5e-3",
        "--save_strategy", "no")
    with open(out / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    keys = set(load_state_dict(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.attention.wqkv.lora_A.weight" in keys and len(keys) == 2 * 5 * 2
    img = os.path.join(work["root"], "data", "images", "img2.png")
    model, tok = ixc25_ms.load(work["model"], adapter=str(out))
    adapted = _logits(model, tok, img)
    base_model, _ = ixc25_ms.load(work["model"])
    assert np.abs(adapted - _logits(base_model, tok, img)).max() > 1e-4, "the adapter changed nothing"
    merged = tmp_path / "merged"
    assert merge_main(["--base_model_name", work["model"], "--adapter_model_name", str(out),
                       "--output_name", str(merged)]) == 0
    mmodel, _ = ixc25_ms.load(str(merged))
    m = _logits(mmodel, tok, img)
    rel = np.linalg.norm(m - adapted) / np.linalg.norm(adapted)
    assert rel <= 1e-5, rel
    import torch
    from parity_tests.reference.language import RefLM
    ref = RefLM(mmodel.cfg, load_state_dict(str(merged)))
    inputs, im, _ = mmodel.interleav_wrap_chat("What is in the picture?", [img])
    r, _, _ = ref.forward(torch.from_numpy(inputs["inputs_embeds"].asnumpy()), torch.from_numpy(im.asnumpy()))
    assert np.linalg.norm(r.numpy() - m) / np.linalg.norm(m) <= 1e-5


def test_resume_after_kill_9_ends_with_the_same_weights(work, tmp_path):
    """A run killed with SIGKILL after a checkpoint, resumed with --resume_from_checkpoint, ends bit for bit
    (within fp32 noise) where an uninterrupted run ends — AdamW state, data order and dropout included."""
    args = ["--model_name_or_path", work["model"]] + BASE + [
        "--max_steps", "8", "--save_steps", "2", "--fix_vit", "False", "--plora_dropout", "0.05",
        "--weight_decay", "0.1", "--warmup_ratio", "0.2"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ixc25_ms.train.cli"]
    ref = tmp_path / "straight"
    subprocess.run(cmd + args + ["--output_dir", str(ref)], cwd=work["root"], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd + args + ["--output_dir", str(out)], cwd=work["root"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "checkpoint-8").exists()
    subprocess.run(cmd + args + ["--output_dir", str(out), "--resume_from_checkpoint"], cwd=work["root"],
                   env=env, check=True, capture_output=True)
    a, b = load_state_dict(str(ref)), load_state_dict(str(out))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    la = [h["loss"] for h in _log(ref)["log_history"] if "loss" in h]
    lb = [h["loss"] for h in _log(out)["log_history"] if "loss" in h]
    np.testing.assert_allclose(lb, la, rtol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(work["root"])
    out = tmp_path / "nan"
    run(work, out, "--max_steps", "6", "--save_steps", "1", "--optim", "sgd", "--learning_rate", "1e9",
        "--max_grad_norm", "0", "--fix_vit", "False", expect=2)
    err = capsys.readouterr().err.strip()
    low = err.lower()  # a non-finite loss or gradient norm, or an update that overflowed the weights
    assert err.count("\n") == 0 and any(m in low for m in ("the loss is nan", "the loss is inf", "norm is nan",
                                                           "norm is inf", "is not finite")), err
    step = int(err.split("step ")[1].split(":")[0])
    good = out / f"checkpoint-{step - 1}"
    assert str(good) in err and good.is_dir() and not (out / f"checkpoint-{step}").exists()
    state = load_state_dict(str(good))
    assert all(np.isfinite(v).all() for v in state.values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(work, tmp_path, monkeypatch, capsys):
    import errno
    from ixc25_ms.train import checkpointing
    monkeypatch.chdir(work["root"])
    real = checkpointing.write_safetensors

    def flaky(path, *a, **k):  # the second checkpoint hits a full disk halfway through writing its weights
        if "checkpoint-4" in str(path):
            open(str(path) + ".partial", "wb").write(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(checkpointing, "write_safetensors", flaky)
    out = tmp_path / "disk"
    run(work, out, "--max_steps", "6", "--save_steps", "2", expect=2)
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "No space left on device" in err and "checkpoint-2" in err
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not [f for f in os.listdir(out) if f.startswith(".")], "a temporary directory was left behind"
    load_state_dict(str(out / "checkpoint-2"))

"""Data-parallel ixc25-finetune under msrun (2 CPU workers): the same weights as one process accumulating their
micro-batches (SGD, LoRA, AdamW, sharded optimizer states), a killed worker ends the job, and the run resumes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ixc25_ms.testing import TinyModelTester
from ixc25_ms.testing.finetune_data import example_finetune_data
from ixc25_ms.weights.layout import load_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# this interpreter's msrun and ixc25-finetune first (another msrun on PATH may belong to another Python);
# msrun runs `python <script>` from PATH, so _env puts this interpreter's bin first


def _tool(name: str) -> str:
    own = os.path.join(BIN, name)
    return own if os.path.exists(own) else (shutil.which(name) or own)


MSRUN, FINETUNE = _tool("msrun"), _tool("ixc25-finetune")
TINY = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000,
        "max_position_embeddings": 4096, "lora_r": 8, "lora_alpha": 8, "web_lora_r": 8, "max_length": 4096,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 224, "patch_size": 14}}
COMMON = ["--per_device_train_batch_size", "1", "--batch_size", "1", "--max_length", "1024", "--hd_num", "4",
          "--fix_vit", "False", "--plora_dropout", "0", "--logging_steps", "1", "--save_strategy", "no",
          "--quiet", "--seed", "5"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    root = example_finetune_data(d)
    with open(os.path.join(root, "data", "single_turn_single_image_example.json")) as f:
        items = json.load(f)
    with open(os.path.join(root, "two.json"), "w") as f:  # two different conversations
        json.dump(items[:1] + items[1:2], f)
    model = TinyModelTester(TINY, seed=1, init="bench").write_checkpoint(str(d / "model"))
    return {"root": root, "model": model}


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3",
                PATH=BIN + os.pathsep + os.environ.get("PATH", ""))


def single(work, out, args):
    cmd = [sys.executable, "-m", "ixc25_ms.train.cli", "--model_name_or_path", work["model"], "--output_dir", str(out)]
    p = subprocess.run(cmd + args, cwd=work["root"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]


def msrun(work, out, args, workers=2, wait=True):
    cmd = [MSRUN, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={_port()}",
           "--join=True", f"--log_dir={out}_logs", FINETUNE,
           "--model_name_or_path", work["model"], "--output_dir", str(out)] + args
    if not wait:
        return subprocess.Popen(cmd, cwd=work["root"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    p = subprocess.run(cmd, cwd=work["root"], env=_env(), capture_output=True, text=True, timeout=600)
    logs = "".join(open(os.path.join(f"{out}_logs", f)).read()[-2000:] for f in os.listdir(f"{out}_logs"))
    assert p.returncode == 0, p.stdout[-2000:] + logs
    return p


def _same(a_dir, b_dir, rtol=1e-5):
    a, b = load_state_dict(str(a_dir)), load_state_dict(str(b_dir))
    assert set(a) == set(b)
    for k in a:
        d = np.linalg.norm(a[k].astype(np.float64) - b[k]) / max(np.linalg.norm(a[k]), 1e-30)
        assert d <= rtol, f"{k}: relative difference {d:.2e}"


@pytest.mark.parametrize("mode", ["sgd_full", "sgd_lora", "adamw_3_steps_sharded"])
def test_two_workers_equal_one_process_accumulating(work, tmp_path, mode):
    extra = {"sgd_full": ["--optim", "sgd", "--learning_rate", "0.5", "--max_steps", "1", "--max_grad_norm", "0"],
             "sgd_lora": ["--optim", "sgd", "--learning_rate", "0.5", "--max_steps", "1", "--use_lora",
                          "--lora_r", "4", "--lora_dropout", "0", "--max_grad_norm", "0"],
             "adamw_3_steps_sharded": ["--learning_rate", "1e-3", "--max_steps", "3", "--weight_decay", "0.1",
                                       "--data_path", "data.txt"]}[mode]
    data = [] if "--data_path" in extra else ["--data_path", "two.json"]
    one, two = tmp_path / "one", tmp_path / "two"
    single(work, one, COMMON + data + extra + ["--gradient_accumulation_steps", "2"])
    sharded = ["--zero_stage", "1"] if "sharded" in mode else []
    msrun(work, two, COMMON + data + extra + ["--gradient_accumulation_steps", "1"] + sharded)
    if "lora" in mode:
        _same(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
    else:
        _same(one, two)
    la = [h["loss"] for h in json.load(open(one / "trainer_state.json"))["log_history"] if "loss" in h]
    lb = [h["loss"] for h in json.load(open(two / "trainer_state.json"))["log_history"] if "loss" in h]
    np.testing.assert_allclose(lb, la, rtol=1e-5)


def test_killed_worker_ends_the_job_and_the_run_resumes(work, tmp_path):
    out = tmp_path / "kill"
    args = COMMON + ["--data_path", "data.txt", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2"]
    p = msrun(work, out, args, wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert p.poll() is None, p.stdout.read()[-2000:]
    pids = subprocess.run(["pgrep", "-f", "--", f"output_dir {out}"], capture_output=True, text=True).stdout.split()
    workers = []
    for pid in map(int, pids):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"MS_ROLE=MS_WORKER" in env:
            workers.append((next((e for e in env if e.startswith(b"RANK_ID=")), b""), pid))
    assert len(workers) == 2, workers
    victim = max(workers)[1]  # rank 1
    os.kill(victim, signal.SIGKILL)
    try:
        rc = p.wait(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = p.stdout.read()
    assert rc != 0, text[-2000:]
    logs = "".join(open(os.path.join(f"{out}_logs", f)).read() for f in os.listdir(f"{out}_logs"))
    assert "rank" in (text + logs).lower()
    assert (out / "checkpoint-2").is_dir()
    msrun(work, out, args + ["--resume_from_checkpoint"])
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 8
    ref = tmp_path / "straight"
    msrun(work, ref, args)
    _same(ref, out)

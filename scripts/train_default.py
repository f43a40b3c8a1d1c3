"""Makes the embedded default model: drawn shape pictures -> a tiny IXC2.5 trained from scratch by ixc25-finetune.

One command, fixed seed: generate the training pictures and conversations (official JSON format), train a small
sentencepiece tokenizer on their text (with the official turn markers), write a randomly initialised
official-layout checkpoint of the tiny architecture below, warm its ViT alone (ixc25-tower-warmup: one-object
pictures, then scenes of 1-4 objects), then train with `ixc25-finetune` (the project's own training path) in four
stages: scenes told in words, one-object pictures, small scenes, the full task (the ViT frozen); then write the
fp16 checkpoint with its provenance into `ixc25_ms/default_model/`. The defaults are the shipped recipe (~3 1/2-4
hours on 2 cores; notes/default-model.md);
a finished stage is kept and a killed run, run again, goes on from there. `--eval N` also scores N held-out
pictures (another seed range) with ixc25-eval.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

from ixc25_ms.train.args import above_zero, count, numbers_as_values, positive, share
from scripts.default_data import (
    TRAIN_SEED_BASE, EVAL_SEED_BASE, TRAIN_SCALE, EASY_SEED_OFFSET, TOWER_SEED_OFFSET, PAIR_SEED_OFFSET,
    SCENE_SEED_OFFSET, LANGUAGE_SEED_OFFSET, READ_SEED_OFFSET, TOWER_TAGS, tower_pictures, make_pictures,
    context_items, corpus_lines,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(os.path.dirname(HERE), "ixc25_ms", "default_model")
# The architecture: every IXC2.5 part at toy width. CLIP-style ViT at 560 px with 28-px patches (a 20x20 grid:
# 100 merged tokens per view; 56-px patches, 25 tokens, trained worse: notes/default-model.md), the HD crops,
# sub_GN/glb_GN layout, projector, InternLM2 with GQA and partial LoRA. The task tokenizer has 600 pieces: the
# task's words are whole pieces ("The circle is red." is 5 tokens; with 320 pieces, mostly bytes, it was 12).
CONFIG = {
    "architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2",
    "vocab_size": 600, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000,
    "rope_scaling": None, "max_position_embeddings": 4096, "bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_length": 4096,
    "lora_r": 16, "lora_alpha": 16, "web_lora_r": 4,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
                      "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 560, "patch_size": 28,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}

def position_table(n_side: int, width: int) -> np.ndarray:
    """(1 + n_side^2, width) CLIP position table started as a 2-D sine-cosine code (MAE's): the first half of the
    channels codes the patch row, the second its column, each as sin/cos at geometric frequencies; the CLS row 0.
    A table started at noise of std 0.02 is invisible next to patch embeddings of std ~1 behind the ViT's
    pre-LayerNorm, so the ViT starts blind to where a patch is (trained on from here)."""
    quarter = width // 4
    freq = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    ys, xs = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    def code(p):
        a = p.reshape(-1, 1) * freq
        return np.concatenate([np.sin(a), np.cos(a)], 1)
    table = np.zeros((1 + n_side * n_side, width), np.float32)
    table[1:, : 4 * quarter] = np.concatenate([code(ys), code(xs)], 1)
    return table


def init_state(seed: int, vit_pos: str = "noise", config: dict = None) -> dict:
    """The untrained weights of `config` (default CONFIG), official key names -> float32 arrays, in expected_parameters order from one
    seeded generator: normal 0.02, norms 1, biases and GN tokens 0, the write/web LoRAs 0 (unused in base mode)."""
    from ixc25_ms.config import IXCConfig
    from ixc25_ms.weights.spec import expected_parameters
    config = config or CONFIG
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in expected_parameters(IXCConfig.from_dict(config)).items():
        if k.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight",
                       "layernorm.weight")):
            a = np.ones(shape, np.float32)
        elif k.endswith("position_embedding.weight") and vit_pos == "sincos":  # 2-D sine-cosine start
            vc = config["vision_config"]
            a = position_table(vc["image_size"] // vc["patch_size"], vc["hidden_size"])
            assert a.shape == tuple(shape), (a.shape, shape)
        elif k.endswith("bias") or "GN" in k or ".lora_sft_" in k or ".lora_dpo_" in k or ".lora_web_" in k:
            a = np.zeros(shape, np.float32)
        else:
            a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        out[k] = a
    return out


def init_checkpoint(dst: str, seed: int, vit_pos: str = "noise", tower: str = "") -> str:
    """The untrained model: official layout, seeded init (normal 0.02, norms 1, biases and GN tokens 0, the
    write/web LoRAs 0 — unused in base mode), the task tokenizer; `tower`: a checkpoint whose vit.* tensors
    replace the initial ones (a tower trained before, as IXC2.5 starts from a trained CLIP)."""
    from ixc25_ms.tiny import train_tiny_tokenizer
    from ixc25_ms.weights.layout import load_state_dict
    from ixc25_ms.weights.safetensors import write_safetensors
    os.makedirs(dst, exist_ok=True)
    state = init_state(seed, vit_pos)
    if tower:
        for k, a in load_state_dict(tower).items():
            if k.startswith("vit.") and k in state:
                if a.shape != state[k].shape:
                    raise SystemExit(f"{tower}: {k} has shape {a.shape}, the model needs {state[k].shape}")
                state[k] = a
    tensors = {k: ("F32", a) for k, a in state.items()}
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)
    # 'assistant' split as the official tokenizer splits it: the official label mask skips a fixed 6 positions
    # after each user turn (end of turn, \n, [UNUSED_TOKEN_146], ass, istant, \n); one piece fewer and the first
    # word of every answer goes untrained (the run of 2026-12-04 18:23 answered without it)
    train_tiny_tokenizer(os.path.join(dst, "tokenizer.model"), vocab_size=CONFIG["vocab_size"], corpus=corpus_lines(),
                         pieces=("ass", "istant"))
    return dst


def finetune_flags(args, data: str = "data.json", out: str = "", batch: int = 0, accum: int = 0, epochs: float = 0,
                   warmup: int = 100, max_steps: int = -1, save_steps: int = 0, keep: int = 0) -> list:
    """ixc25-finetune's command line for a stage of the recipe; unset arguments take the picture stage's values."""
    max_steps = args.max_steps if max_steps < 0 else max_steps
    return ["--data_path", data, "--output_dir", out or os.path.join(args.work, "run"), "--overwrite_output_dir",
            "--fix_vit", str(bool(args.fix_vit)), "--fix_sampler", "False", "--use_lora", "False", "--hd_num", str(args.hd_num),
            "--max_length", "4096", "--batch_size", "1", "--per_device_train_batch_size", str(batch or args.batch),
            "--gradient_accumulation_steps", str(accum or args.accum), "--num_train_epochs", str(epochs or args.epochs),
            "--learning_rate", str(args.lr), "--weight_decay", "0.05", "--adam_beta2", "0.98", "--warmup_steps", str(warmup),
            "--lr_scheduler_type", "cosine", "--max_grad_norm", "1.0", "--plora_dropout", "0.0", "--logging_steps",
            "50", "--save_strategy", "steps", "--save_steps", str(save_steps or args.save_steps), "--save_total_limit",
            str(keep or args.keep), "--seed", str(args.seed)] + (
            ["--max_steps", str(max_steps)] if max_steps else []) + (["--torch_compile", "True"] if args.jit else [])


def full_task_flags(args) -> list:
    """ixc25-finetune's command line for the full task: a work/run holding checkpoint-N folders (a run killed
    part way) resumes from the last of them (--resume_from_checkpoint), the earlier stages being kept as done."""
    from ixc25_ms.train.checkpointing import checkpoints
    resume = ["--resume_from_checkpoint", "True"] if checkpoints(os.path.join(args.work, "run")) else []
    return finetune_flags(args) + resume


def export(run_dir: str, dst: str, command: str, notes: dict) -> None:
    """fp16 official-layout checkpoint + config + tokenizer + PROVENANCE.md (command, seed, sha256 of each file)."""
    from ixc25_ms.weights.layout import load_state_dict
    from ixc25_ms.weights.safetensors import write_safetensors
    os.makedirs(dst, exist_ok=True)
    state = load_state_dict(run_dir)
    write_safetensors(os.path.join(dst, "model.safetensors"),
                      {k: ("F16", v.astype(np.float16)) for k, v in state.items()})
    for f in ("config.json", "tokenizer.model"):
        with open(os.path.join(run_dir, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    sums = {f: hashlib.sha256(open(os.path.join(dst, f), "rb").read()).hexdigest()
            for f in ("config.json", "tokenizer.model", "model.safetensors")}
    with open(os.path.join(dst, "PROVENANCE.md"), "w") as f:
        f.write("# The embedded default model\n\nMade by `" + command + "` (scripts/train_default.py: drawn pictures, "
                "a task tokenizer, then ixc25-finetune from random initialisation, the ViT first trained alone by "
                "ixc25_ms.train.tower_warmup when the command has --tower_warmup).\n\n")
        for k, v in notes.items():
            f.write(f"- {k}: {v}\n")
        f.write("\nsha256:\n```\n" + "".join(f"{v}  {k}\n" for k, v in sums.items()) + "```\n")


def span(text: str, cast=int, least=1, most=None) -> tuple:
    """'LOW-HIGH' (or one number) -> (low, high), least <= low <= high (<= most), each read by `cast`: the
    argparse type of the count flags (and, with float and 0, of share ranges)."""
    try:
        lo, hi = (cast(x) for x in (text.split("-") if "-" in text else (text, text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH (e.g. 1-2), got {text!r}") from None
    if not least <= lo <= hi or (most is not None and hi > most):
        bound = "" if most is None else f" <= {most}"
        raise argparse.ArgumentTypeError(f"expected {least} <= LOW <= HIGH{bound}, got {text!r}")
    return lo, hi


def objects(text: str) -> tuple:
    """span of objects in a picture: the task draws 1-4."""
    return span(text, most=4)


def kinds(text: str) -> tuple:
    """'1,3' -> (1, 3): question kinds 1-4 (shapes.QUESTIONS); '' -> () (all four)."""
    try:
        out = tuple(int(x) for x in text.split(",")) if text else ()
    except ValueError:
        out = (0,)
    if any(k not in (1, 2, 3, 4) for k in out):
        raise argparse.ArgumentTypeError(f"expected question kinds 1-4 separated by commas, got {text!r}")
    return out


STAGE_SAVE_STEPS = 100  # a stage before the full task keeps its last checkpoint every this many steps of 16


def _stage(args, start: str, name: str, data: str, finetune, cwd: str = "") -> str:
    """One stage before the full task: ixc25-finetune from work/`start` on `data`, 16 a step, one epoch, 50 warmup
    steps, run from `cwd` (where the data's picture paths are relative) -> work/`name` (written as name.run,
    renamed at the end). It keeps its last checkpoint every STAGE_SAVE_STEPS steps, and a stage killed part way
    resumes from it on a rerun (--resume_from_checkpoint: the weights of an unbroken run); the checkpoint folders
    are removed before the rename. Returns `name`, or None when ixc25-finetune failed."""
    from ixc25_ms.train.checkpointing import checkpoints
    dst = os.path.abspath(os.path.join(args.work, name))
    run, model = dst + ".run", os.path.abspath(os.path.join(args.work, start))  # absolute before the chdir below
    flags = finetune_flags(args, data=data, out=run, batch=16, accum=1, epochs=1, warmup=50, max_steps=0,
                           save_steps=STAGE_SAVE_STEPS, keep=1)
    if checkpoints(run):
        flags += ["--resume_from_checkpoint", "True"]
    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        if finetune(["--model_name_or_path", model] + flags):
            return None
    finally:
        os.chdir(here)
    for d in checkpoints(run):
        shutil.rmtree(d)
    os.replace(run, dst)
    return name


def language_warmup(args, start: str, finetune):
    """The language model's first stage: ixc25-finetune on --language_warmup text-only conversations whose first
    turn tells the scene in words (context_items), 16 a step, one epoch, from work/`start`; -> "init_lang", the
    picture stage's start (the ViT untouched: no picture). Skipped on a rerun once init_lang exists."""
    if os.path.exists(os.path.join(args.work, "init_lang")):
        return "init_lang"
    data = os.path.abspath(os.path.join(args.work, "language.json"))
    with open(data + ".tmp", "w") as f:
        json.dump(context_items(args.language_warmup, TRAIN_SEED_BASE + args.seed * 1_000_000 + LANGUAGE_SEED_OFFSET), f)
    os.replace(data + ".tmp", data)
    return _stage(args, start, "init_lang", data, finetune)


def _read(args, start: str, finetune, name: str, sub: str, n: int, objects, kinds) -> str:
    """A read stage: ixc25-finetune on n small pictures of `objects` (low, high) objects (work/`sub`, seeds from
    READ_SEED_OFFSET), each asked one question of `kinds` (None: all four), 16 a step, one epoch, from
    work/`start` -> work/`name`. Skipped on a rerun once work/`name` exists."""
    if os.path.exists(os.path.join(args.work, name)):
        return name
    root = os.path.abspath(os.path.join(args.work, sub))
    data = make_pictures(root, 0, TRAIN_SEED_BASE + args.seed * 1_000_000 + READ_SEED_OFFSET - EASY_SEED_OFFSET,
                         turns=(1, 1), chitchat=0.0, scale=TRAIN_SCALE, easy=n, easy_objects=objects,
                         easy_kinds=kinds, log=None)
    return _stage(args, start, name, data, finetune, cwd=root)


def read_stage(args, start: str, finetune):
    """The read stage, between the warm-ups and the full task: ixc25-finetune on --read_stage small one-object
    pictures (work/read, seeds from READ_SEED_OFFSET), each asked its colour or its shape (one question), 16 a step,
    one epoch, from work/`start` -> "init_read"; --read_objects and --read_kinds widen it to small scenes of
    several objects asked any of the chosen kinds (one question a picture). Off a long tower warm-up the language
    model learns here to read a lone object (notes/default-model.md: 96 % of shapes after 250 steps of 16 off a
    3,000-step warm-up); shape questions alone make it forget colour. Skipped on a rerun once init_read exists."""
    return _read(args, start, finetune, "init_read", "read", args.read_stage, args.read_objects, args.read_kinds or None)


def scene_read_stage(args, start: str, finetune):
    """A second read stage, after read_stage: ixc25-finetune on --read_scenes small scenes of 1-4 objects (work/
    read_scenes; 200-560 px, drawn from the read stage's seeds as scenes), each asked one question of kinds 1-3
    (counts most: every scene allows one), 16 a step, one epoch, from work/`start` -> "init_read_scenes". Off the
    lone-object read it took the full task's counts from 41.7 to 59.2 % on the first 100 held-out pictures (run X,
    notes/default-model-runs.md, 2026-12-07). Skipped on a rerun once init_read_scenes exists."""
    return _read(args, start, finetune, "init_read_scenes", "read_scenes", args.read_scenes, (1, 4), (1, 2, 3))


def tower_stages(args) -> str:
    """The tower's warm-up before ixc25-finetune (ixc25_ms.train.tower_warmup.warm_up, 16 a step, from work/init):
    --tower_warmup steps with the max head (lr 1e-3) -> init_warm; then --tower_dense steps with the per-patch loss
    added (lr 5e-4) -> init_dense; then --tower_pair steps on fresh pictures tagged "colour shape" (max head and
    per-patch loss, lr 5e-4) -> init_pair; then --tower_scenes steps on fresh 1-4 object scenes, each patch asked
    its own object's shape (max head and per-patch loss, lr 5e-4) -> init_scenes. Each scored on 300 held-out
    pictures; a finished stage is not redone on a rerun. Returns the last stage's directory name."""
    from ixc25_ms.train.tower_warmup import warm_up
    base = TRAIN_SEED_BASE + args.seed * 1_000_000
    work = lambda d: os.path.join(args.work, d)
    pictures = {"tower": (TOWER_SEED_OFFSET, args.tower_tags), "tower_pair": (PAIR_SEED_OFFSET, "pair"),
                "tower_scenes": (SCENE_SEED_OFFSET, args.tower_scene_tags)}
    stages = [("init_warm", args.tower_warmup, 1e-3, 50, 0.0, "tower")]
    if args.tower_dense:  # then the max and the per-patch loss together, at half the rate
        stages.append(("init_dense", args.tower_dense, 5e-4, 30, 1.0, "tower"))
    if args.tower_pair:  # then colour beside shape, on fresh pictures
        stages.append(("init_pair", args.tower_pair, 5e-4, 30, 1.0, "tower_pair"))
    if args.tower_scenes:  # then each object's own shape on its own patches, in scenes of several
        stages.append(("init_scenes", args.tower_scenes, 5e-4, 30, 1.0, "tower_scenes"))
    drawn, start = {}, "init"
    for i, (name, steps, lr, warmup, dense, sub) in enumerate(stages):
        if not os.path.exists(work(name)):  # a finished stage is not redone on a rerun, nor its pictures drawn
            if sub not in drawn:  # (training tags.json, 300 held-out) under work/sub, work/sub_heldout
                offset, kind = pictures[sub]
                view, patch = CONFIG["vision_config"]["image_size"], CONFIG["vision_config"]["patch_size"]
                drawn[sub] = (tower_pictures(work(sub), args.tower_pictures, base + offset, kind, view, patch),
                              tower_pictures(work(sub + "_heldout"), 300, EVAL_SEED_BASE + TOWER_SEED_OFFSET, kind, view,
                                             patch))
            tags, held = drawn[sub]
            warm_up(work(start), tags, work(name), steps=steps, batch=16, lr=lr, warmup=warmup, seed=args.seed + i,
                    use_jit=args.jit, eval_data=held, dense=dense, colour=args.tower_colour)
        start = name
    return start


RUN_FLAGS = {"work", "out", "jit", "save_steps", "keep", "eval"}  # flags that do not change the weights


def parser() -> argparse.ArgumentParser:
    ap = numbers_as_values(argparse.ArgumentParser(prog="train_default", description=__doc__.split("\n")[0]))
    ap.add_argument("--work", default=os.path.join(os.getcwd(), "default_train"), help="working directory")
    ap.add_argument("--out", default=PACKAGE_DIR, help="where the fp16 model is written")
    ap.add_argument("--pictures", type=count, default=4000, help="training pictures")
    ap.add_argument("--epochs", type=above_zero, default=1.0)
    ap.add_argument("--max_steps", type=count, default=0)
    ap.add_argument("--batch", type=positive, default=1, help="pictures per micro-batch")
    ap.add_argument("--accum", type=positive, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=above_zero, default=1e-3)
    ap.add_argument("--hd_num", type=positive, default=9)
    ap.add_argument("--vit_pos", choices=("noise", "sincos"), default="noise", help="the ViT position table's "
                    "start: normal(0, 0.02) as every other weight, or a 2-D sine-cosine code (position_table)")
    ap.add_argument("--chitchat", type=share, default=0.25, help="text-only chit-chat items (greetings, 'What can "
                    "you do?') in the full task, as a share of --pictures")
    ap.add_argument("--context", type=share, default=0.0, help="text-only items stating a scene in words, as a "
                    "share of --pictures (context_items)")
    ap.add_argument("--describe_last", type=int, choices=(0, 1), default=0, help="1: 'Describe the image.' asked last in each "
                    "training conversation (answers cannot be copied from a description in the history); 0: drawn order")
    ap.add_argument("--easy", type=count, default=800, help="extra small training pictures (200-560 px, --easy_objects objects)")
    ap.add_argument("--easy_objects", type=objects, default=(1, 1), help="objects in an easy picture: LOW-HIGH")
    ap.add_argument("--easy_kinds", type=kinds, default=(1, 3), help="question kinds asked of easy pictures, e.g. '3' (a shape "
                    "curriculum) or '1,3'; empty: all four")
    ap.add_argument("--questions", type=lambda t: None if t == "all" else span(t), default=(3, 4), help="questions per training picture: LOW-HIGH, or 'all' (every "
                    "question whose answer no earlier turn gives away: grounded_turns)")
    ap.add_argument("--vit_width", type=positive, default=128, help="ViT width "
                    "(heads of 32 channels, MLP 4x)")
    ap.add_argument("--vit_layers", type=positive, default=4)
    ap.add_argument("--llm_width", type=positive, default=CONFIG["hidden_size"], help="InternLM2 width (heads of 32 "
                    "channels over 2 KV heads, MLP 3x)")
    ap.add_argument("--llm_layers", type=positive, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--save_steps", type=positive, default=400, help="checkpoint every N steps")
    ap.add_argument("--keep", type=positive, default=1, help="checkpoints kept (more: a training curve to evaluate)")
    ap.add_argument("--tower_warmup", type=count, default=500, help="first train the ViT alone this many steps of "
                    "16 on --tower_pictures pictures tagged as --tower_tags says (ixc25_ms.train.tower_warmup)")
    ap.add_argument("--tower_dense", type=count, default=2500, help="after --tower_warmup, this many steps of 16 with "
                    "a per-patch loss added (tower_warmup --dense 1, lr 5e-4): shape spread over the object's patches")
    ap.add_argument("--tower_pair", type=count, default=0, help="after the shape warm-up, this many steps of 16 on "
                    "--tower_pictures fresh one-object pictures tagged 'colour shape' (max head and per-patch loss, "
                    "lr 5e-4), meant to add colour to a shape-trained tower (measured: colour added, shape lost; "
                    "notes/default-model.md)")
    ap.add_argument("--tower_scenes", type=count, default=3000, help="after the shape warm-up, this many steps of 16 on "
                    "--tower_pictures fresh scenes of 1-4 objects, every patch asked its own object's shape (max head "
                    "and per-patch loss, lr 5e-4): one-object pictures let the tower spread one shape over all its "
                    "tokens, so among several objects a token showed the picture's shapes, not its object's")
    ap.add_argument("--tower_scene_tags", choices=("shapes", "centres"), default="shapes", help="what the "
                    "--tower_scenes stage asks of each patch: its own object's shape, or also, on the one patch that "
                    "holds an object's centre, '{shape} centre' (a token per object, for counts; tower_pictures)")
    ap.add_argument("--tower_colour", type=share, default=0.25, help="add this weight x a per-patch regression "
                    "of each patch's mean colour to every tower stage (tower_warmup --colour): keeps colour readable "
                    "while shape is taught (measured: colour kept, shape slower; notes/default-model.md)")
    ap.add_argument("--tower_pictures", type=positive, default=16000)
    ap.add_argument("--tower_tags", choices=TOWER_TAGS, default="shape", help="the warm-up's pictures and tags: one "
                    "object tagged with its shape, its colour-shape pair, or its colour and its shape as two tags "
                    "(both; measured: colour learnt, shape not, in 2,000 steps: notes/default-model.md), or 1-4 "
                    "objects tagged with their colour-shape pairs (tower_pictures)")
    ap.add_argument("--language_warmup", type=count, default=16000, help="first train the language model this many "
                    "text-only conversations (16 a step) on scenes told in words (context_items), then the pictures")
    ap.add_argument("--read_stage", type=count, default=20000, help="then this many small one-object pictures, each "
                    "asked its colour or its shape, 16 a step (read_stage), before the full task")
    ap.add_argument("--read_objects", type=objects, default=(1, 1), help="objects in a read-stage picture: LOW-HIGH "
                    "(1-3: the asked object among others, as the full task asks it)")
    ap.add_argument("--read_kinds", type=kinds, default=(1, 3), help="question kinds the read stage asks, e.g. "
                    "'1,2,3' ('': all four)")
    ap.add_argument("--read_scenes", type=count, default=8000, help="then, after the read stage, this many small scenes of 1-4 "
                    "objects, each asked one question of kinds 1-3, 16 a step (scene_read_stage): counts and the asked "
                    "object among others before the full task")
    ap.add_argument("--init_tower", default="", help="start the ViT from this checkpoint's vit.* tensors "
                    "(e.g. scripts/tower_shape.py --save_tower)")
    ap.add_argument("--fix_vit", type=int, choices=(0, 1), default=1, help="1: the ViT is not trained (ixc25-finetune --fix_vit True)")
    ap.add_argument("--jit", action="store_true", help="compile the training step (mindspore.jit)")
    ap.add_argument("--seed", type=count, default=0)
    ap.add_argument("--eval", type=count, default=0, help="score this many held-out pictures after training")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.work = os.path.abspath(args.work)  # the stages chdir: a relative --work would then point elsewhere
    # a pilot must not replace the shipped weights: only flags that leave the weights as they are may keep --out's default
    changed = [k for k, v in vars(args).items() if k not in RUN_FLAGS and v != ap.get_default(k)]
    if changed and os.path.abspath(args.out) == os.path.abspath(PACKAGE_DIR):
        ap.error(f"--{changed[0]} changes the shipped recipe, and --out defaults to the shipped model's directory "
                 f"({PACKAGE_DIR}): name --out")
    later = [f for f in ("tower_dense", "tower_pair", "tower_scenes") if getattr(args, f)]
    if later and not args.tower_warmup:
        ap.error(f"--{later[0]} continues a --tower_warmup: give both")
    if args.tower_scene_tags != "shapes" and not args.tower_scenes:
        ap.error(f"--tower_scene_tags {args.tower_scene_tags} tags the --tower_scenes stage: give both")
    if args.tower_pair and args.tower_tags != "shape":
        ap.error("--tower_pair follows a shape warm-up: it needs --tower_tags shape")
    if args.vit_width % 32 or args.llm_width % 64:  # heads of 32 channels; the language model's over 2 KV heads
        ap.error(f"--vit_width must be a multiple of 32 and --llm_width of 64, got {args.vit_width} and {args.llm_width}")
    CONFIG["vision_config"].update(hidden_size=args.vit_width, intermediate_size=4 * args.vit_width,
                                   num_attention_heads=max(1, args.vit_width // 32), num_hidden_layers=args.vit_layers)
    CONFIG.update(hidden_size=args.llm_width, intermediate_size=3 * args.llm_width,
                  num_attention_heads=max(2, args.llm_width // 32), num_hidden_layers=args.llm_layers)
    command = "python scripts/train_default.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    make_pictures(args.work, args.pictures, TRAIN_SEED_BASE + args.seed * 1_000_000, turns=args.questions,
                  chitchat=args.chitchat, scale=TRAIN_SCALE, easy=args.easy, context=args.context, describe_last=bool(args.describe_last),
                  easy_objects=args.easy_objects, easy_kinds=args.easy_kinds or None)
    init_checkpoint(os.path.join(args.work, "init"), args.seed, args.vit_pos, args.init_tower)
    start = "init"
    if args.tower_warmup:
        start = tower_stages(args)
    from ixc25_ms.train.cli import main as finetune
    if args.language_warmup:
        start = language_warmup(args, start, finetune)
        if start is None:
            return 1
    if args.read_stage:
        start = read_stage(args, start, finetune)
        if start is None:
            return 1
    if args.read_scenes:
        start = scene_read_stage(args, start, finetune)
        if start is None:
            return 1
    t_data = time.perf_counter() - t0
    print(f"[default] data, initial checkpoint{' and warm-ups' * bool(args.tower_warmup or args.language_warmup or args.read_stage or args.read_scenes)} "
          f"in {t_data:.0f} s", flush=True)
    cwd = os.getcwd()
    os.chdir(args.work)
    try:
        rc = finetune(["--model_name_or_path", start] + full_task_flags(args))
    finally:
        os.chdir(cwd)
    if rc:
        return rc
    t_train = time.perf_counter() - t0 - t_data
    with open(os.path.join(args.work, "run", "trainer_state.json")) as f:
        state = json.load(f)
    notes = {"seed": args.seed, "training pictures": args.pictures, "easy pictures": args.easy,
             "tower warm-up steps": args.tower_warmup, "tower per-patch steps": args.tower_dense,
             "tower colour-shape steps": args.tower_pair, "tower scene steps": args.tower_scenes,
             "language warm-up conversations": args.language_warmup, "read-stage pictures": args.read_stage,
             "read-stage objects": "-".join(map(str, args.read_objects)),
             "read-stage kinds": ",".join(map(str, args.read_kinds)) or "all",
             "scene-read pictures": args.read_scenes,
             "text-only context items": int(round(args.context * args.pictures)),
             "chit-chat items": int(round(args.chitchat * args.pictures)),
             "optimizer steps": state["global_step"], "data + init (+ warm-ups) seconds": round(t_data), "training seconds": round(t_train)}
    export(os.path.join(args.work, "run"), args.out, command, notes)
    print(f"[default] wrote {args.out} ({t_train:.0f} s of training)", flush=True)
    if args.eval:
        from ixc25_ms.eval import main as evaluate
        held = make_pictures(os.path.join(args.work, "heldout"), args.eval, EVAL_SEED_BASE, turns=(4, 4),
                             chitchat=0.0)
        return evaluate(["--model", args.out, "--data", held, "--json", os.path.join(args.work, "eval.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

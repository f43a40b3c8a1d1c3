"""`ixc25-finetune`'s command line: the official finetune.py flags (transformers TrainingArguments) and ours."""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
# flags that configure a PyTorch engine: accepted so official scripts run unchanged, each with what replaces it
ENGINE_FLAGS = {
    "deepspeed": "DeepSpeed is not used: MindSpore runs the step, data parallelism comes from msrun and the "
                 "config's ZeRO stage shards optimizer states across workers (see notes/distributed.md)",
    "report_to": "reporting goes to trainer_state.json and the progress bar",
    "evaluation_strategy": "no evaluation during training (the official scripts pass 'no')",
    "per_device_eval_batch_size": "no evaluation during training",
    "cache_dir": "models are read from local directories only",
    "local_rank": "the rank comes from msrun / mindspore.communication",
    "ddp_find_unused_parameters": "parameters outside the graph are skipped by the optimizer, as torch does",
    "dataloader_num_workers": "samples are prepared in the training process",
    "tf32": "no TF32 on this backend",
    "eval_strategy": "no evaluation during training (transformers' later name of --evaluation_strategy)",
    "eval_steps": "no evaluation during training",
    "load_best_model_at_end": "no evaluation during training, so no best checkpoint: the last step's weights are "
                              "the output",
    "run_name": "reporting goes to trainer_state.json and the progress bar",
    "logging_dir": "reporting goes to trainer_state.json and the progress bar",
}
ENGINE_BOOLS = {"tf32", "ddp_find_unused_parameters", "load_best_model_at_end"}  # "--flag" alone means True


def str2bool(v) -> bool:
    """transformers' string_to_bool: yes/true/t/y/1 and no/false/f/n/0, any case."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {v!r}")


@dataclass
class FinetuneArgs:
    # ModelArguments / DataArguments of the official finetune.py
    model_name_or_path: str = ""
    data_path: str = "data.txt"
    given_num: bool = False
    batch_size: int = 4
    resolution: int = 560
    hd_num: int = 18
    # TrainingArguments (transformers defaults, with finetune.py's own)
    output_dir: str = ""
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: float = 500
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    seed: int = 42
    max_length: int = 8192
    use_lora: bool = False
    fix_vit: bool = True
    fix_sampler: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    resume_from_checkpoint: Optional[str] = None
    torch_compile: bool = False  # here: the step compiled with mindspore.jit
    # LoraArguments
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_weight_path: str = ""
    lora_bias: str = "none"
    # ours, in the same style
    plora_dropout: float = 0.05
    freeze_llm: bool = False
    use_backbone_lora: int = 0
    vit_layer_decay: float = 1.0
    llm_lr_scale: float = 1.0
    sampling: str = "permutation"
    quiet: bool = False
    jit: bool = False
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None  # the --deepspeed JSON (its ZeRO stage shards optimizer states here)


HELP = {
    "given_num": "read `ratio x 1000` samples per data file (data.txt lines `path ratio`)",
    "batch_size": "samples per dataset draw (official Sample_dataset); a micro-batch holds "
                  "per_device_train_batch_size x batch_size samples",
    "plora_dropout": "dropout of the partial LoRA's input in training (official 0.05; 0 = deterministic)",
    "freeze_llm": "freeze the whole LLM (embeddings, layers, norm, output head)",
    "use_backbone_lora": "LoRA of this rank (alpha 2R) on the ViT's attention/MLP linears; 0 = off",
    "vit_layer_decay": "layer-wise LR decay of the ViT: layer i of N gets decay^(N-i), its embeddings decay^(N+1)",
    "llm_lr_scale": "LR multiplier of the LLM's parameters (0.2 in the IXC2.5 report's SFT stage)",
    "sampling": "permutation: every sample once per epoch in a seeded order (default); official: draws with "
                "replacement as the official Sample_dataset",
    "jit": "compile the training step with mindspore.jit (same as --torch_compile True)",
    "zero_stage": "with several workers (msrun): 1 or more shards the optimizer states across them (ZeRO-1); "
                  "default: the stage of a --deepspeed config",
    "quiet": "no progress bar",
}


# argparse reads "-1e-4" as an option (its negative-number pattern has no exponent): "--lr -1e-4" then fails with
# "expected one argument" instead of reaching the range check that names the flag and the value
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


def numbers_as_values(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let `p` take negative numbers in any notation ("-1e-4", "-.5", "-inf") as option values."""
    p._negative_number_matcher = NEGATIVE_NUMBER  # the pattern CPython's argparse consults
    return p


# argparse types of counts, sizes, rates and shares (train_default, ixc25-tower-warmup): a value out of range ends
# the run at parsing, the flag and the value named
def count(text: str, cast=int, least=0) -> int:
    """A number of things (pictures, steps, ...), at least `least`: the argparse type of the count flags, so that
    -5 pictures end the run at parsing with the value named, not deep in a stage."""
    try:
        n = cast(text)
    except ValueError:
        n = None
    if n is None or not least <= n < float("inf"):  # NaN fails both
        raise argparse.ArgumentTypeError(f"expected a {'number' if cast is float else 'whole number'} >= {least}, "
                                         f"got {text!r}")
    return n


def positive(text: str) -> int:
    """A size or a step (a width, a batch, checkpoints kept): a whole number >= 1."""
    return count(text, least=1)


def above_zero(text: str) -> float:
    """A rate or a number of epochs: a number > 0."""
    x = count(text, cast=float)
    if x == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return x


def share(text: str) -> float:
    """A share or a weight (of --pictures, of a loss): a number >= 0."""
    return count(text, cast=float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ixc25-finetune", description="Fine-tune InternLM-XComposer-2.5 on MindSpore "
                                "with the official finetune.py command line.")
    for f in dataclasses.fields(FinetuneArgs):
        if f.name == "deepspeed_config":
            continue
        flag = f"--{f.name}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=HELP.get(f.name))
        if f.type in ("bool", bool):
            p.add_argument(flag, nargs="?", const=True, type=str2bool, **kw)
        elif f.name == "lora_target_modules":
            p.add_argument(flag, nargs="+", **kw)
        elif f.name in ("save_total_limit",):
            p.add_argument(flag, type=int, **kw)
        elif f.name == "resume_from_checkpoint":
            p.add_argument(flag, nargs="?", const="True", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=typ, **kw)
    for name in ENGINE_FLAGS:
        bare = dict(nargs="?", const="True") if name in ENGINE_BOOLS else {}
        p.add_argument(f"--{name}", dest=f"engine_{name}", default=None, help=argparse.SUPPRESS, **bare)
    numbers_as_values(p)
    return p


def parse_args(argv=None, log=print, quiet_engine: bool = False) -> FinetuneArgs:
    p = build_parser()
    ns = vars(p.parse_args(argv))
    engine = {}
    for name, why in ENGINE_FLAGS.items():
        engine[name] = ns.pop(f"engine_{name}", None)
        if engine[name] is not None and not quiet_engine:
            log(f"ixc25-finetune: --{name} accepted: {why}")
    args = FinetuneArgs(**ns, deepspeed_config=engine["deepspeed"])
    if not args.output_dir:
        p.error("--output_dir is required")
    if not args.model_name_or_path:
        p.error("--model_name_or_path is required")
    for name in ("batch_size", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "hd_num"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    # numbers out of range: told here, not after the model and the data have loaded
    finite = lambda x: x == x and abs(x) != float("inf")  # noqa: E731
    at_least = lambda lo: (lambda x: finite(x) and x >= lo, f">= {lo}")  # noqa: E731
    above = lambda lo: (lambda x: finite(x) and x > lo, f"> {lo}")  # noqa: E731
    unit = (lambda x: 0 <= x <= 1, "in [0, 1]")
    below_one = (lambda x: 0 <= x < 1, "in [0, 1)")  # dropouts (MindSpore's takes p < 1) and Adam's betas
    ranges = {"learning_rate": at_least(0), "weight_decay": at_least(0), "warmup_ratio": unit,
              "warmup_steps": at_least(0), "max_grad_norm": at_least(0), "adam_epsilon": above(0),
              "adam_beta1": below_one, "adam_beta2": below_one, "lora_dropout": below_one,
              "plora_dropout": below_one, "use_backbone_lora": at_least(0), "vit_layer_decay": above(0),
              "llm_lr_scale": at_least(0), "logging_steps": above(0), "zero_stage": at_least(0),
              "resolution": at_least(1)}
    if args.max_steps <= 0:  # else the epochs are not read (transformers)
        ranges["num_train_epochs"] = above(0)
    if args.use_lora:
        ranges["lora_r"] = at_least(1)
    if args.save_strategy == "steps":
        ranges["save_steps"] = above(0)
    for name, (ok, want) in ranges.items():
        if not ok(getattr(args, name)):
            p.error(f"--{name} must be {want}, got {getattr(args, name)}")
    if args.save_total_limit is not None and args.save_total_limit < 0:
        p.error(f"--save_total_limit must be >= 0 (0: keep all), got {args.save_total_limit}")
    from .optim import SCHEDULES
    if args.lr_scheduler_type not in SCHEDULES:
        p.error(f"--lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {args.lr_scheduler_type!r}")
    if args.optim not in ("adamw_torch", "adamw", "sgd"):
        p.error(f"--optim must be adamw_torch or sgd, got {args.optim!r}")
    if args.sampling not in ("permutation", "official"):
        p.error(f"--sampling must be 'permutation' or 'official', got {args.sampling!r}")
    if args.save_strategy not in ("steps", "epoch", "no"):
        p.error(f"--save_strategy must be steps, epoch or no, got {args.save_strategy!r}")
    if args.lora_bias != "none":
        p.error("--lora_bias: only 'none' is supported (the official default)")
    if args.torch_compile:
        args.jit = True
    return args

"""The fine-tuning loop: micro-batches, accumulation, clipping, optimizer steps, logging, checkpoints, resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from typing import List, Optional

import mindspore as ms
from mindspore import ops
import numpy as np

from .. import load as load_model
from ..weights.loader import stream_into
from .args import FinetuneArgs
from .batch import Collator
from .checkpointing import (checkpoints, publish_dir, read_optimizer, rotate, write_adapter, write_json,
                            write_official)
from .data import DataError, assistant_header_warning, check_pieces, describe, epoch_order, load_samples, official_draws
from .forward import TrainForward, forward_inputs, vit_is_frozen
from .optim import Optimizer, clip_coefficient, global_norm, lr_lambda, warmup_steps
from .prepare import parameter_counts, prepare, state_of


LENGTH_BUCKET = 64  # under jit, micro-batches are right-padded to a multiple of this many positions


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that cannot be written); the message says where."""


class Trainer:
    """One fine-tuning run of `ixc25-finetune` (see args.FinetuneArgs for the flags)."""

    def __init__(self, args: FinetuneArgs, log=print, rank: int = 0, world: int = 1, comm=None):
        self.args, self.log, self.rank, self.world, self.comm = args, log, rank, world, comm
        if args.bf16 or args.fp16:
            log(f"ixc25-finetune: --{'bf16' if args.bf16 else 'fp16'}: the {ms.get_context('device_target')} "
                f"backend computes in float32 here (mixed precision needs Ascend); the final weights are saved in "
                f"{'bf16' if args.bf16 else 'fp16'}")
        self.model, self.tok = load_model(args.model_name_or_path, dtype="float32", lazy_loras=False)  # saved back whole
        check_pieces(self.tok)
        header = assistant_header_warning(self.tok)
        if header and rank == 0:
            log(f"ixc25-finetune: warning: {header}")
        self.t = prepare(self.model, args, log).in_graph_only()
        if args.gradient_checkpointing:  # recompute: keep each layer's input, redo its forward in the backward
            from .prepare import use_recompute
            self.t.notes.append(f"recompute on {use_recompute(self.model)} layers")
        if any(getattr(c, "fused_attention", None) is not None for _, c in self.model.cells_and_names()):
            self.t.notes.append("fused CPU attention")  # set on load with the CPU kernels (ixc25_ms.fused_attention)
        self.geo = self.model.vit.geometry  # crop side and merged grid of the tower
        self.collate = Collator(self.tok, args.max_length, args.hd_num, self.geo, self.model.cfg.pad_token_id)
        samples = load_samples(args.data_path, args.given_num, args.seed, log if rank == 0 else (lambda *a: None))
        self.samples, skipped = [], 0
        for s in samples:
            if self.collate.trained_tokens(s) == 0:
                skipped += 1
                if rank == 0:
                    log(f"ixc25-finetune: warning: {s.where}: no trained token within --max_length "
                        f"{args.max_length} (the official would train on nothing and log loss 0); skipped")
            else:
                self.samples.append(s)
        if not self.samples:
            raise DataError(f"{args.data_path}: no sample has a trained token within --max_length {args.max_length}")
        self.micro = args.per_device_train_batch_size * args.batch_size  # samples per micro-batch per worker
        self.per_step = args.gradient_accumulation_steps * world  # micro-batches per optimizer step
        self.steps_per_epoch = max(1, math.ceil(self._micro_per_epoch() / self.per_step))
        self.total = args.max_steps if args.max_steps > 0 else int(math.ceil(args.num_train_epochs * self.steps_per_epoch))
        self.warmup = warmup_steps(self.total, args.warmup_steps, args.warmup_ratio)
        # optimizer states: all here, or (--zero_stage >= 1 / a ZeRO --deepspeed config, several workers) only for
        # the parameters this rank owns; the owner broadcasts each updated parameter
        from .distributed import shard_owners, zero_stage
        self.zero = zero_stage(args.deepspeed_config, args.zero_stage) if world > 1 else 0
        sizes = [int(np.prod(p.shape)) for p in self.t.params]
        self.owners = shard_owners(sizes, world) if self.zero else [rank] * len(sizes)
        self.mine = [i for i, o in enumerate(self.owners) if o == rank]
        self.opt = Optimizer([self.t.params[i] for i in self.mine], [self.t.names[i] for i in self.mine], args.optim,
                             args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
                             self.t.lr_scale[self.mine])
        self._pool, self._ahead = None, {}
        self.model.set_train(True)
        # a frozen ViT runs outside the gradient (forward_inputs): the compiled step holds no ViT
        self.vit_frozen = vit_is_frozen(self.t.names)
        fwd = TrainForward(self.model, self.geo, vit_frozen=self.vit_frozen)
        self.grad_fn = ms.value_and_grad(fwd, None, self.t.params)
        # compiled with dynamic shapes (lengths and view counts vary): a few graphs, not one per shape
        self.grad_jit = ms.jit(self.grad_fn, dynamic=1) if args.jit else None
        # text-only micro-batches get their own graph, None (no views) a constant inside it: MindSpore 2.10's
        # dynamic-shape jit fails on a None argument (IndexError in _add_mutable_attr), and eagerly they ran
        # ~5x slower than compiled (2.2 s a step of 16 short items)
        self.grad_jit_text = ms.jit(self._text_grad, dynamic=1) if args.jit else None
        self.state = {"global_step": 0, "epoch": 0.0, "max_steps": self.total, "log_history": [],
                      "num_train_epochs": math.ceil(self.total / self.steps_per_epoch),
                      "sampling": args.sampling, "trainable": self.t.names}
        if rank == 0:
            n, total = parameter_counts(self.model, self.t)
            log(f"ixc25-finetune: {describe(self.samples)} ({skipped} skipped); sampling: {args.sampling}; "
                f"{self.micro} sample(s) per micro-batch x {self.per_step} micro-batch(es) per step; "
                f"{self.steps_per_epoch} steps per epoch, {self.total} steps; trainable {n:,} of {total:,} "
                f"parameters ({len(self.t.names)} tensors)" + "".join(f"; {x}" for x in self.t.notes))

    # -- data ------------------------------------------------------------------------------------------
    def _micro_per_epoch(self) -> int:
        if self.args.sampling == "official":  # len(Mix_dataset) = samples / batch_size draws
            draws = max(1, len(self.samples) // self.args.batch_size)
            return math.ceil(draws / self.args.per_device_train_batch_size)
        return math.ceil(len(self.samples) / self.micro)

    def epoch_micro_batches(self, epoch: int) -> List[List[int]]:
        """Sample indices of every micro-batch of an epoch, in order (the same on every worker)."""
        a = self.args
        if a.sampling == "official":
            order = official_draws(self.samples, max(1, len(self.samples) // a.batch_size), a.batch_size,
                                   a.seed, epoch)
        else:
            order = epoch_order(len(self.samples), a.seed, epoch)
        return [order[i:i + self.micro] for i in range(0, len(order), self.micro)]

    def step_micro_batches(self, step: int) -> List[List[int]]:
        """This worker's micro-batches of optimizer step `step` (0-based): global batch = per_step micro-batches,
        micro-batch k of it goes to worker k % world."""
        epoch, k = divmod(step, self.steps_per_epoch)
        epoch_mbs = self.epoch_micro_batches(epoch)
        mbs = epoch_mbs[k * self.per_step:(k + 1) * self.per_step]
        if len(mbs) % self.world:  # a short last batch: padded from the epoch's start, as DistributedSampler pads
            mbs = mbs + epoch_mbs[:self.world - len(mbs) % self.world]
        return mbs[self.rank::self.world]

    # -- one optimizer step ------------------------------------------------------------------------------
    def _prepare(self, step: int):
        """The host arrays of this worker's micro-batches of `step` (pictures decoded, transformed, labelled)."""
        out = []
        for idx in self.step_micro_batches(step):
            batch = self.collate([self.samples[i] for i in idx])
            if self.grad_jit is not None:  # compiled: lengths bucketed, so nearby lengths share one graph
                batch = batch.padded(LENGTH_BUCKET, self.collate.pad)
            out.append(batch)
        return out

    def _batches(self, step: int):
        """This step's micro-batches; the next step's are prepared meanwhile on a second thread (decoding and
        resizing pictures is host work the compiled step leaves a core free for)."""
        from concurrent.futures import ThreadPoolExecutor
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ixc25-data")
        fut = self._ahead.pop(step, None)
        batches = fut.result() if fut is not None else self._prepare(step)
        if step + 1 < self.total:
            self._ahead[step + 1] = self._pool.submit(self._prepare, step + 1)
        return batches

    def _text_grad(self, ids, image_rows, im_bool, im_mask, cos, sin, attn_mask, label_pos, label_ids, label_w):
        """grad_fn of a text-only micro-batch (no views), compiled apart as grad_jit_text."""
        return self.grad_fn(ids, image_rows, im_bool, im_mask, None, cos, sin, attn_mask, label_pos, label_ids, label_w)

    def train_step(self, step: int):
        """-> (loss as logged, grad norm, tokens, has_image) after the update of step `step`."""
        a = self.args
        acc, loss_sum, tokens, has_image = None, 0.0, 0, False
        for j, batch in enumerate(self._batches(step)):
            k = step * self.per_step + self.rank + j * self.world  # the micro-batch's index in the global order
            ms.set_seed(a.seed * 1_000_003 + k)  # dropout fixed by (seed, micro-batch): resumes and workers agree
            inputs = forward_inputs(self.model, batch, vit_frozen=self.vit_frozen, use_jit=self.grad_jit is not None)
            if self.grad_jit is None:
                loss, grads = self.grad_fn(*inputs)
            elif batch.views is None:
                loss, grads = self.grad_jit_text(*inputs[:4], *inputs[5:])
            else:
                loss, grads = self.grad_jit(*inputs)
            acc = grads if acc is None else [x + g for x, g in zip(acc, grads)]
            loss_sum += float(loss.asnumpy()) / a.gradient_accumulation_steps
            tokens += batch.n_tokens
            has_image |= batch.views is not None
        if self.comm is not None:
            acc, loss_sum, tokens, has_image = self.comm.reduce(acc, loss_sum, tokens, has_image)
        if not math.isfinite(loss_sum):
            raise TrainingError(self._nan_message(step, loss_sum))
        active = self.t.active(has_image)
        scale = 1.0 / (a.gradient_accumulation_steps * self.world)  # transformers: each micro-batch loss / GA
        norm = global_norm(acc, active, scale)
        if not math.isfinite(norm):  # finite loss, overflowing gradient: stop before it reaches the weights
            raise TrainingError(self._nan_message(step, norm, "gradient norm"))
        lr = a.learning_rate * lr_lambda(a.lr_scheduler_type, step, self.warmup, self.total)
        self.opt.step([acc[i] for i in self.mine], lr, [active[i] for i in self.mine],
                      grad_scale=scale * clip_coefficient(norm, a.max_grad_norm))
        if self.zero:  # every updated parameter from its owner to the others
            for r in range(self.world):
                self.comm.broadcast([self.t.params[i] for i, o in enumerate(self.owners) if o == r and active[i]], r)
        return loss_sum, norm, tokens, has_image

    def _nan_message(self, step: int, value: float, what: str = "loss") -> str:
        ck = checkpoints(self.args.output_dir)
        keep = f"the last good checkpoint is {ck[-1]}" if ck else "no checkpoint was written before it"
        return f"step {step + 1}: the {what} is {value}; training stopped, {keep}"

    # -- the run -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        a = self.args
        start = self._resume() if a.resume_from_checkpoint else 0
        bar = None
        if self.rank == 0 and not a.quiet:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=start, desc="ixc25-finetune", dynamic_ncols=True)
        t_run, logged, loss_acc = time.perf_counter(), start, 0.0
        for step in range(start, self.total):
            t0 = time.perf_counter()
            loss, norm, tokens, _ = self.train_step(step)
            dt = time.perf_counter() - t0
            loss_acc += loss
            self.state["global_step"] = gs = step + 1
            self.state["epoch"] = gs / self.steps_per_epoch
            lr_next = a.learning_rate * lr_lambda(a.lr_scheduler_type, gs, self.warmup, self.total)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_next:.3g}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
            if self._every(gs, a.logging_steps):
                entry = {"loss": loss_acc / (gs - logged), "grad_norm": norm, "learning_rate": lr_next,
                         "epoch": round(self.state["epoch"], 2), "step": gs, "tokens_per_s": tokens / dt}
                self.state["log_history"].append(entry)
                loss_acc, logged = 0.0, gs
                if bar is None and self.rank == 0 and not a.quiet:
                    self.log(json.dumps(entry))
            end_of_epoch = gs % self.steps_per_epoch == 0
            if (a.save_strategy == "steps" and self._every(gs, a.save_steps)) or (a.save_strategy == "epoch" and end_of_epoch):
                self.save_checkpoint(gs)
        if bar is not None:
            bar.close()
        runtime = time.perf_counter() - t_run
        self.state["log_history"].append({"train_runtime": runtime, "step": self.state["global_step"],
                                          "epoch": round(self.state["epoch"], 2)})
        self.save_final()
        return self.state

    def _every(self, gs: int, every: float) -> bool:
        n = every if every >= 1 else max(1, int(math.ceil(every * self.total)))  # a ratio < 1, as transformers
        return n > 0 and gs % int(n) == 0

    # -- writing -----------------------------------------------------------------------------------------
    def _lora_settings(self):
        a = self.args
        llm = dict(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_target_modules) \
            if a.use_lora else None
        from ..vision.registry import spec_of
        vit = dict(r=a.use_backbone_lora, alpha=2 * a.use_backbone_lora, dropout=a.lora_dropout,
                   targets=list(spec_of(self.model.cfg.vision).lora_targets)) if a.use_backbone_lora else None
        return llm, vit

    def _write_weights(self, dst: str, dtype: str) -> None:
        a = self.args
        llm, vit = self._lora_settings()
        if llm or vit:
            extra = [n for n in self.t.names if ".lora_A." not in n and ".lora_B." not in n]
            write_adapter(self.model, dst, os.path.abspath(a.model_name_or_path), llm, vit,
                          state_of(self.model, extra))
        else:
            names = [n for n, _ in self.model.parameters_and_names()]
            write_official(state_of(self.model, names), a.model_name_or_path, dst, dtype)

    def _optimizer_file(self) -> str:
        return f"optimizer-rank{self.rank}.safetensors" if self.zero else "optimizer.safetensors"

    def save_checkpoint(self, gs: int) -> None:
        """checkpoint-N: weights (fp32), optimizer state (one file per rank when sharded), trainer state; built
        in a temporary directory by rank 0 and renamed, so a crash or a full disk leaves the previous one."""
        from ..weights.safetensors import write_safetensors
        from ..weights.tags import to_st
        a = self.args
        dst = os.path.join(a.output_dir, f"checkpoint-{gs}")
        stage = os.path.join(a.output_dir, f".optimizer-{gs}")
        if self.zero:  # each rank writes its shard of the optimizer states, then all meet
            os.makedirs(stage, exist_ok=True)
            write_safetensors(os.path.join(stage, self._optimizer_file()),
                              {k: to_st(v) for k, v in self.opt.state_arrays().items()})
            self.comm.agree(True)
        if self.rank != 0:
            return
        bad = [n for n, p in zip(self.t.names, self.t.params) if not ops.isfinite(p).all()]  # no host copy
        if bad:  # an update overflowed (finite loss, huge step): never save it, so every checkpoint is good
            raise TrainingError(self._nan_message(gs - 1, "not finite", f"weight {bad[0]}"
                                                  + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")))

        def build(tmp):
            self._write_weights(tmp, "fp32")  # exact: a resumed run continues from these bits
            if self.zero:
                for f in os.listdir(stage):
                    os.replace(os.path.join(stage, f), os.path.join(tmp, f))
            else:
                write_safetensors(os.path.join(tmp, self._optimizer_file()),
                                  {k: to_st(v) for k, v in self.opt.state_arrays().items()})
            write_json(os.path.join(tmp, "trainer_state.json"), dict(self.state, world_size=self.world,
                                                                      zero_stage=self.zero))
            write_json(os.path.join(tmp, "training_args.json"), asdict(a))
        try:
            publish_dir(build, dst)
            shutil.rmtree(stage, ignore_errors=True)
        except OSError as e:
            prev = [c for c in checkpoints(a.output_dir) if c != dst]
            raise TrainingError(f"{dst}: cannot save the checkpoint ({e.strerror or e}); "
                                + (f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint")) from None
        rotate(a.output_dir, a.save_total_limit)

    def save_final(self) -> None:
        if self.rank != 0:
            return
        a = self.args
        dtype = "bf16" if a.bf16 else ("fp16" if a.fp16 else "fp32")
        os.makedirs(a.output_dir, exist_ok=True)
        self._write_weights(a.output_dir, dtype)
        write_json(os.path.join(a.output_dir, "trainer_state.json"), self.state)

    def _resume(self) -> int:
        a = self.args
        path = a.resume_from_checkpoint
        if str(path).lower() in ("true", "1", "yes"):
            found = checkpoints(a.output_dir)
            if not found:
                raise TrainingError(f"--resume_from_checkpoint: no checkpoint-N folder in {a.output_dir}")
            path = found[-1]
        if not os.path.isdir(path):
            raise TrainingError(f"--resume_from_checkpoint: {path} is not a directory")
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        llm, vit = self._lora_settings()
        if llm or vit:  # the fresh branches take the checkpoint's values
            self._load_adapter_weights(path)
        else:
            stream_into(self.model, path)
        opt_file = os.path.join(path, self._optimizer_file())
        if not os.path.isfile(opt_file):
            raise TrainingError(f"--resume_from_checkpoint: {opt_file} is missing (a sharded checkpoint resumes with "
                                f"the same number of workers, saved {state.get('world_size', 1)}, now {self.world})")
        self.opt.load_state_arrays(read_optimizer(opt_file))
        self.state.update(global_step=state["global_step"], epoch=state["epoch"], log_history=state["log_history"])
        if self.rank == 0:
            self.log(f"ixc25-finetune: resumed from {path} at step {state['global_step']}")
        return int(state["global_step"])

    def _load_adapter_weights(self, path: str) -> None:
        from .lora import PEFT_PREFIX, read_adapter
        from ..weights.layout import load_state_dict
        _, weights = read_adapter(path)
        params = dict(self.model.parameters_and_names())
        for k, v in weights.items():
            name = k[len(PEFT_PREFIX):]
            params[name].set_data(ms.Tensor(v))
        extra = os.path.join(path, "non_lora_trainables.safetensors")
        if os.path.isfile(extra):
            for k, v in load_state_dict(extra).items():
                params[k].set_data(ms.Tensor(v))

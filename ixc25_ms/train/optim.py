"""Optimizers with torch/transformers semantics on MindSpore ops (CPU and Ascend): AdamW, SGD, clipping, LR schedules."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
GROUP = 48  # parameters per compiled update graph (a graph's Python loop is unrolled: depth grows with it)
# without the in-place kernels: trainable bytes up to which the update runs compiled; above, eagerly op by op:
# a compiled group graph held every temporary of its parameters at once (mid-config full fine-tuning: 6.9 GB
# after the gradients, over 19 GB in the compiled update, 12.8 GB eager; run of 2026-12-04)
COMPILED_UPDATE_MAX_BYTES = 256 << 20
LAYERNORM_PARAMS = ("layer_norm1.", "layer_norm2.", "pre_layrnorm.", "post_layernorm.")  # the ViT's nn.LayerNorm


def lr_lambda(kind: str, step: int, warmup: int, total: int) -> float:
    """transformers' schedules (get_scheduler) as the multiplier of the base LR at optimizer step `step` (0-based:
    the first update uses step 0, so with warmup it has LR 0, as in transformers)."""
    if kind not in SCHEDULES:
        raise ValueError(f"--lr_scheduler_type {kind!r} is not one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant_with_warmup":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # cosine, num_cycles 0.5


def warmup_steps(total: int, warmup_steps_arg: int, warmup_ratio: float) -> int:
    """transformers: --warmup_steps when > 0, else ceil(warmup_ratio * total)."""
    return warmup_steps_arg if warmup_steps_arg > 0 else int(math.ceil(warmup_ratio * total))


def decays(name: str) -> bool:
    """transformers' get_decay_parameter_names: every parameter but biases and those of nn.LayerNorm modules
    (the ViT's norms). InternLM2's RMSNorm is not an nn.LayerNorm, so its weights DO decay (an official trap)."""
    return "bias" not in name and not any(k in name for k in LAYERNORM_PARAMS)


class _Update(nn.Cell):
    """One optimizer update over the parameters and states it holds; the jit twin compiles once per `active`
    pattern (the hyper-parameters arrive as (n,) tensors, so a new LR does not recompile)."""

    def __init__(self, kind: str, params, m, v):
        super().__init__()
        self.kind = kind
        self.params = ms.ParameterTuple(params)
        self.m = ms.ParameterTuple(m) if kind == "adamw" else ()
        self.v = ms.ParameterTuple(v) if kind == "adamw" else ()

    def construct(self, grads, scale, decay, step_size, bc2_sqrt, eps, beta1, beta2, active):
        for i in range(len(self.params)):
            if active[i]:
                p, g = self.params[i], grads[i].astype(ms.float32) * scale
                if self.kind == "sgd":  # torch.optim.SGD: L2 added to the gradient, then p -= lr * d_p
                    w = p.astype(ms.float32)
                    ops.assign(p, (w - (g + w * decay[i]) * step_size[i]).astype(p.dtype))
                else:  # torch.optim.AdamW (_single_tensor_adamw)
                    w = p.astype(ms.float32) * decay[i]
                    m = self.m[i] + (g - self.m[i]) * (1.0 - beta1)  # lerp, as torch
                    v = self.v[i] * beta2 + g * g * (1.0 - beta2)
                    ops.assign(self.m[i], m)
                    ops.assign(self.v[i], v)
                    denom = ops.sqrt(v) / bc2_sqrt[i] + eps
                    ops.assign(p, (w - m / denom * step_size[i]).astype(p.dtype))
        return True

    @ms.jit
    def compiled(self, grads, scale, decay, step_size, bc2_sqrt, eps, beta1, beta2, active):
        return self.construct(grads, scale, decay, step_size, bc2_sqrt, eps, beta1, beta2, active)


class _InPlace:
    """The in-place updates of csrc/optim_kernels.cc (eager use only: they write into their inputs' buffers)."""

    def __init__(self, path: str):
        def op(name):
            return ops.Custom(f"{path}:{name}", out_shape=lambda *a: [1], out_dtype=lambda *a: ms.int32,
                              func_type="aot")
        self.adamw, self.sgd = op("IxcAdamWInPlace"), op("IxcSgdInPlace")


def _in_place_kernels(params) -> Optional[_InPlace]:
    """The in-place update kernels where they can run (CPU kernels on, every parameter fp32), else None."""
    from ..cpu_kernels import library_path, switch
    if not params or any(p.dtype != ms.float32 for p in params) or not switch(ms.float32):
        return None
    path = library_path()
    return None if path is None else _InPlace(path)


class Optimizer:
    """AdamW (`--optim adamw_torch`: decoupled decay p *= 1 - lr*wd, then Adam with bias correction, per-parameter
    step counts) or SGD (`--optim sgd`: p -= lr * (g + wd * p)). Parameters whose gradient is not in the graph
    this step (`active` False: torch's grad None) are skipped entirely — no decay, no moment update, no step —
    as torch does. `lr_scale` per parameter carries layer-wise LR decay / LLM LR scaling."""

    def __init__(self, params: Sequence[Parameter], names: Sequence[str], kind: str = "adamw_torch",
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, lr_scale=None):
        if kind not in ("adamw_torch", "adamw", "sgd"):
            raise ValueError(f"--optim {kind!r} is not supported here (adamw_torch, sgd)")
        self.kind = "sgd" if kind == "sgd" else "adamw"
        self.params, self.names = list(params), list(names)
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(map(float, betas)), float(eps)
        self.wd = np.array([self.weight_decay if decays(n) else 0.0 for n in self.names], np.float64)
        self.lr_scale = np.ones(len(self.params)) if lr_scale is None else np.asarray(lr_scale, np.float64)
        self.steps = np.zeros(len(self.params), np.int64)
        if self.kind == "adamw":
            self.m = [Parameter(initializer("zeros", p.shape, ms.float32), name=f"adam_m.{n}", requires_grad=False)
                      for p, n in zip(self.params, self.names)]
            self.v = [Parameter(initializer("zeros", p.shape, ms.float32), name=f"adam_v.{n}", requires_grad=False)
                      for p, n in zip(self.params, self.names)]
        else:
            self.m = self.v = []
        n = len(self.params)
        self._in_place = _in_place_kernels(self.params)  # the eager update without temporaries
        self._groups = [(i, min(n, i + GROUP)) for i in range(0, n, GROUP)]
        self._updates = [_Update(self.kind, self.params[a:b], self.m[a:b], self.v[a:b]) for a, b in self._groups]

    def step(self, grads, lr: float, active: Sequence[bool], use_jit: Optional[bool] = None,
             grad_scale: float = 1.0) -> None:
        """One update with the gradients `grads` * `grad_scale` (accumulation average and clipping folded in, so no
        scaled copy of the gradients is made). use_jit None: in place where the CPU kernels are (no temporaries,
        one kernel per parameter), else compiled when the trainable parameters are at most
        COMPILED_UPDATE_MAX_BYTES and eager op by op above (see there)."""
        if use_jit is None:
            use_jit = self._in_place is None and (sum(int(np.prod(p.shape)) * 4 for p in self.params)
                                                  <= COMPILED_UPDATE_MAX_BYTES)
        active = tuple(bool(a) for a in active)
        self.steps += np.asarray(active, np.int64)
        lrs = lr * self.lr_scale
        b1, b2 = self.betas
        t = np.maximum(self.steps, 1).astype(np.float64)
        if self.kind == "adamw":
            decay = 1.0 - lrs * self.wd
            step_size = lrs / (1.0 - b1 ** t)
            bc2 = np.sqrt(1.0 - b2 ** t)
        else:
            decay, step_size, bc2 = self.wd, lrs, np.ones_like(lrs)
        if not use_jit and self._in_place is not None:  # eager: each parameter updated where it lies
            done = None
            for i, p in enumerate(self.params):
                if not active[i]:
                    continue
                g = grads[i] if grads[i].dtype == ms.float32 else grads[i].astype(ms.float32)
                if self.kind == "adamw":
                    h = np.array([grad_scale, decay[i], step_size[i], bc2[i], self.eps, b1, b2], np.float32)
                    done = self._in_place.adamw(p, self.m[i], self.v[i], g, Tensor(h))
                else:
                    h = np.array([grad_scale, decay[i], step_size[i]], np.float32)
                    done = self._in_place.sgd(p, g, Tensor(h))
            if done is not None:
                done.asnumpy()  # the writes are done before anything reads the parameters
            return
        scale = Tensor(np.float32(grad_scale))
        for (a, b), upd in zip(self._groups, self._updates):
            vec = lambda x: Tensor(np.asarray(x[a:b], np.float32))  # noqa: E731  per-parameter values
            args = (ms.mutable(tuple(grads[a:b])), scale, vec(decay), vec(step_size), vec(bc2), float(self.eps), b1,
                    b2, active[a:b])
            (upd.compiled if use_jit else upd)(*args)

    def state_arrays(self) -> Dict[str, np.ndarray]:
        out = {"steps": self.steps.copy()}
        if self.kind == "adamw":
            for n, m, v in zip(self.names, self.m, self.v):
                out[f"exp_avg.{n}"] = m.asnumpy()
                out[f"exp_avg_sq.{n}"] = v.asnumpy()
        return out

    def load_state_arrays(self, state: Dict[str, np.ndarray]) -> None:
        self.steps = np.asarray(state["steps"], np.int64).copy()
        if self.kind == "adamw":
            for n, m, v in zip(self.names, self.m, self.v):
                m.set_data(Tensor(state[f"exp_avg.{n}"]))
                v.set_data(Tensor(state[f"exp_avg_sq.{n}"]))


def global_norm(grads, active: Sequence[bool], scale: float = 1.0) -> float:
    """torch.nn.utils.clip_grad_norm_'s total L2 norm over the gradients in the graph (times `scale`)."""
    sq = [(g.astype(ms.float32) ** 2).sum() for g, a in zip(grads, active) if a]
    if not sq:
        return 0.0
    # one host sync for all tensors (one per tensor cost ~2 ms each: 0.23 s a step of the default model's 113)
    return math.sqrt(float(ops.stack(sq).asnumpy().astype(np.float64).sum())) * scale


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """max_norm / (total + 1e-6), clamped to 1 (torch); 1 when clipping is off (max_grad_norm 0)."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))

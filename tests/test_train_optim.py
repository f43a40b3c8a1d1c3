"""The fine-tuning optimizers and schedules against torch and transformers' formulas (written out by hand here)."""
import math

import mindspore as ms
import numpy as np
import pytest
import torch

from ixc25_ms.train.optim import Optimizer, clip_coefficient, decays, global_norm, lr_lambda, warmup_steps

NAMES = ["model.layers.0.attention.wqkv.weight", "vit.vision_tower.vision_model.encoder.layers.0.layer_norm1.weight",
         "vision_proj.0.bias", "model.norm.weight", "model.layers.0.attention.wqkv.lora_sft_A.weight"]


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(6, 4), (4,), (6,), (4,), (3, 4)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    return init, grads


def test_decay_groups_follow_transformers():
    """Biases and nn.LayerNorm weights (the ViT's) do not decay; InternLM2's RMSNorm weights do (not LayerNorm)."""
    assert [decays(n) for n in NAMES] == [True, False, False, True, True]


@pytest.mark.parametrize("use_jit,in_place", [(False, True), (False, False), (True, False)])
def test_adamw_equals_torch_with_skipped_parameters(use_jit, in_place):
    """Compiled, eager op by op, and eager in place (csrc/optim_kernels.cc, the path above 256 MB)."""
    init, grads = _setup()
    active = [[True] * 5, [True, True, True, True, False], [True, False, True, True, False]]
    params = [ms.Parameter(ms.Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(init)]
    opt = Optimizer(params, NAMES, "adamw_torch", weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    assert (opt._in_place is not None) or not in_place  # the CPU kernels build here
    if not in_place:
        opt._in_place = None
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    groups = [{"params": [p for p, n in zip(tp, NAMES) if decays(n)], "weight_decay": 0.1},
              {"params": [p for p, n in zip(tp, NAMES) if not decays(n)], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    for step, (g, act) in enumerate(zip(grads, active)):
        lr = 1e-2 * (step + 1) / 3
        for pg in topt.param_groups:
            pg["lr"] = lr
        for p, gi, a in zip(tp, g, act):
            p.grad = torch.tensor(gi) if a else None  # torch skips a parameter whose grad is None
        topt.step()
        opt.step([ms.Tensor(x) for x in g], lr, act, use_jit=use_jit)
    for p, t, n in zip(params, tp, NAMES):
        np.testing.assert_allclose(p.asnumpy(), t.detach().numpy(), rtol=2e-6, atol=1e-7, err_msg=n)
    assert opt.steps.tolist() == [3, 2, 3, 3, 1]


@pytest.mark.parametrize("use_jit", [True, False])  # compiled; eager, in place
def test_sgd_equals_torch_with_weight_decay(use_jit):
    init, grads = _setup(1)
    params = [ms.Parameter(ms.Tensor(a.copy()), name=f"q{i}") for i, a in enumerate(init)]
    opt = Optimizer(params, NAMES, "sgd", weight_decay=0.05)
    assert opt._in_place is not None
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    topt = torch.optim.SGD([{"params": [p for p, n in zip(tp, NAMES) if decays(n)], "weight_decay": 0.05},
                            {"params": [p for p, n in zip(tp, NAMES) if not decays(n)], "weight_decay": 0.0}], lr=0.1)
    for g in grads:
        for p, gi in zip(tp, g):
            p.grad = torch.tensor(gi)
        topt.step()
        opt.step([ms.Tensor(x) for x in g], 0.1, [True] * 5, use_jit=use_jit)
    for p, t in zip(params, tp):
        np.testing.assert_allclose(p.asnumpy(), t.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_clipping_as_torch():
    _, grads = _setup(2)
    g = grads[0]
    tg = [torch.tensor(x, requires_grad=True) for x in g]
    for t, x in zip(tg, g):
        t.grad = torch.tensor(x)
    total = torch.nn.utils.clip_grad_norm_(tg, 0.5)
    ours = global_norm([ms.Tensor(x) for x in g], [True] * 5)
    assert abs(ours - float(total)) <= 1e-6 * float(total)
    coef = clip_coefficient(ours, 0.5)
    np.testing.assert_allclose(g[0] * coef, tg[0].grad.numpy(), rtol=1e-6)
    assert clip_coefficient(ours, 0.0) == 1.0 and clip_coefficient(0.1, 1.0) == 1.0  # 0 disables, no upscaling


def test_schedules_are_transformers():
    # total 10 optimizer steps, 2 warmup steps: the LR used at step s (0-based), written out by hand
    assert [lr_lambda("constant", s, 2, 10) for s in (0, 5)] == [1.0, 1.0]
    assert [lr_lambda("constant_with_warmup", s, 2, 10) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [lr_lambda("linear", s, 2, 10) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cos = [lr_lambda("cosine", s, 2, 10) for s in (2, 6, 10)]
    assert cos[0] == 1.0 and abs(cos[1] - 0.5) < 1e-12 and abs(cos[2]) < 1e-12
    assert abs(lr_lambda("cosine", 4, 2, 10) - 0.5 * (1 + math.cos(math.pi * 2 / 8))) < 1e-12
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        lr_lambda("polynomial", 0, 0, 10)
    assert warmup_steps(100, 0, 0.01) == 1 and warmup_steps(100, 7, 0.5) == 7 and warmup_steps(3, 0, 0.5) == 2

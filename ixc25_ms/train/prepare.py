"""The model for a fine-tuning run: loaded in fp32, freeze flags and LoRA applied as finetune.py does, LR groups."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ..language.linear import PLoRA
from ..vision.registry import spec_of
from .lora import add_lora, apply_adapter

VISION = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
WRITE_WEB = re.compile(r"\.lora_(sft|dpo|web)_[AB]\.")  # the write/web LoRAs: never in the graph in base mode


@dataclass
class Trainables:
    """The tensors a run trains, in a fixed order, with what the optimizer needs per tensor."""

    names: List[str]
    params: list
    lr_scale: np.ndarray
    vision: np.ndarray  # bool: on the vision side (in the graph only when the step holds an image)
    in_graph: np.ndarray  # bool: can be in the graph at all (False: write/web LoRAs in base mode)
    notes: List[str] = field(default_factory=list)

    def active(self, has_image: bool) -> np.ndarray:
        return self.in_graph & (has_image | ~self.vision)

    def in_graph_only(self) -> "Trainables":
        """Without the tensors that can never be in the graph (the write/web LoRAs in base mode): the official
        run gives them requires_grad, and torch then skips them (grad None), so they need no gradient and no
        optimizer state — 2.4 B parameters at 7B."""
        keep = np.flatnonzero(self.in_graph)
        left = [self.names[i] for i in np.flatnonzero(~self.in_graph)]
        notes = self.notes + ([f"{len(left)} tensors never in the graph in base mode (write/web LoRAs) get no "
                               f"gradient or optimizer state"] if left else [])
        return Trainables([self.names[i] for i in keep], [self.params[i] for i in keep], self.lr_scale[keep],
                          self.vision[keep], self.in_graph[keep], notes)


def vit_layer_scale(name: str, n_layers: int, decay: float) -> float:
    """Layer-wise LR decay of the ViT (BEiT style): encoder layer i of N -> decay^(N-i), embeddings and
    pre_layrnorm -> decay^(N+1); everything after the ViT 1."""
    if decay == 1.0 or not name.startswith("vit."):
        return 1.0
    m = re.search(r"\.encoder\.layers\.(\d+)\.", name)
    return decay ** (n_layers - int(m.group(1))) if m else decay ** (n_layers + 1)


def prepare(model, args, log=print) -> Trainables:
    """Applies the flags to a loaded model and returns what trains:
    - fix_vit True freezes the ViT; False trains it without its unused `post_layernorm` (finetune.py replaces it
      by Identity);
    - fix_sampler freezes `vision_proj`;
    - use_lora adds PEFT LoRA on the target modules, acting on every token, and then — as finetune.py with PEFT
      0.8 does: it freezes `model.`, and get_peft_model freezes every parameter without `lora_` in its name —
      only LoRA weights train: not the output head, GN tokens, projector or ViT, whatever fix_vit/fix_sampler
      say (the partial LoRA's `Plora_*`, frozen before PEFT, stays frozen);
    - freeze_llm (ours) freezes `model.` and `output`; use_backbone_lora R (ours) freezes the ViT and adds LoRA
      (rank R, alpha 2R) on its attention and MLP linears.
    The partial LoRA's training dropout is set to plora_dropout."""
    notes = []
    for _, cell in model.cells_and_names():
        if isinstance(cell, PLoRA):
            cell.plora_dropout = float(args.plora_dropout)
    if args.use_lora:
        mods = add_lora(model, args.lora_target_modules, args.lora_r, args.lora_alpha, args.lora_dropout,
                        prefix="model.", seed=args.seed)
        notes.append(f"LoRA r={args.lora_r} alpha={args.lora_alpha} dropout={args.lora_dropout} on {len(mods)} "
                     f"LLM linears")
    if args.use_backbone_lora:
        r = int(args.use_backbone_lora)
        mods = add_lora(model, spec_of(model.cfg.vision).lora_targets, r, 2 * r, args.lora_dropout, prefix="vit.",
                        seed=args.seed + 7919, flag="--use_backbone_lora")
        notes.append(f"backbone LoRA r={r} alpha={2 * r} on {len(mods)} ViT linears")
    if args.lora_weight_path:
        mods = apply_adapter(model, args.lora_weight_path)
        notes.append(f"LoRA weights from {args.lora_weight_path} ({len(mods)} modules)")

    def trains(name: str) -> bool:
        lora = ".lora_A." in name or ".lora_B." in name
        if args.use_lora:
            return lora
        if name.startswith("vit."):
            if args.use_backbone_lora:
                return lora
            return not args.fix_vit and "post_layernorm" not in name
        if name.startswith("vision_proj."):
            return not args.fix_sampler
        if name.startswith("model."):
            return lora if args.freeze_llm else True
        if name.startswith("output."):
            return not args.freeze_llm
        return True  # plora_glb_GN / plora_sub_GN: no official flag freezes them

    n_vit = model.cfg.vision.num_hidden_layers
    names, params, scale = [], [], []
    for name, p in model.parameters_and_names():
        p.requires_grad = trains(name)
        if p.requires_grad:
            names.append(name)
            params.append(p)
            s = vit_layer_scale(name, n_vit, args.vit_layer_decay)
            if name.startswith(("model.", "output.")):
                s *= args.llm_lr_scale
            scale.append(s)
    if not params:
        raise ValueError("the flags freeze every parameter: nothing to train")
    vision = np.array([n.startswith(VISION) for n in names])
    in_graph = np.array([WRITE_WEB.search(n) is None for n in names])
    return Trainables(names, params, np.array(scale), vision, in_graph, notes)


def use_recompute(model) -> int:
    """--gradient_checkpointing: MindSpore recompute on every decoder layer and every tower encoder layer (their
    activations are recomputed in the backward pass instead of kept). Returns the number of layers."""
    from ..language.layers import DecoderLayer
    from ..parity.hooks import layer_stack  # the tower's encoder layers, whatever the tower names them
    layers = [c for _, c in model.cells_and_names() if isinstance(c, DecoderLayer)] + list(layer_stack(model.vit))
    for cell in layers:
        cell.recompute()
    return len(layers)


def parameter_counts(model, t: Trainables) -> Tuple[int, int]:
    total = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    return sum(int(np.prod(p.shape)) for p in t.params), total


def state_of(model, names) -> Dict[str, np.ndarray]:
    params = dict(model.parameters_and_names())
    return {n: params[n].asnumpy() for n in names}

"""Activation capture with MindSpore forward hooks, and the cells behind the parity tool's rows."""
# Hooks run in PyNative only: inside a `mindspore.jit` graph MindSpore 2.10 tries to compile a registered hook
# into the graph (its Python side effects are lost, and a hook that converts its output to numpy fails at run
# time), so `capture` removes every hook on exit and the tool never calls a jit path while capturing.
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Sequence, Tuple

OUTPUT, INPUT = "output", "input"  # a tap saves the cell's output, or the first argument it was called with
Tap = Tuple[str, object, str]  # (row name, cell, OUTPUT | INPUT)


@contextmanager
def capture(taps: Sequence[Tap], save: Callable[[str, object], None]):
    """Within the block, each tap's cell hands its output (or first input) to `save(name, tensor)` as it runs.

    Every tap must fire exactly once inside the block: a second call of a tapped cell, or a tap that never
    fired, is a RuntimeError naming the row (the rows would otherwise be silently wrong or missing)."""
    fired = {name: 0 for name, _, _ in taps}
    handles = []

    def make(name, where):
        def once(value):
            fired[name] += 1
            if fired[name] > 1:
                raise RuntimeError(f"parity capture: row {name!r} fired twice (its cell ran more than once)")
            save(name, value)

        if where == OUTPUT:
            def hook(cell, args, output):
                once(output)
        else:
            def hook(cell, args):
                once(args[0])
        return hook

    try:
        for name, cell, where in taps:
            if where == OUTPUT:
                handles.append(cell.register_forward_hook(make(name, where)))
            elif where == INPUT:
                handles.append(cell.register_forward_pre_hook(make(name, where)))
            else:
                raise ValueError(f"tap {name!r}: 'where' must be {OUTPUT!r} or {INPUT!r}, got {where!r}")
        yield fired
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, k in fired.items() if k == 0]
    if missing:
        raise RuntimeError(f"parity capture: rows {missing} were not produced (their cells did not run eagerly)")


def layer_stack(tower):
    """The tower's encoder layers: the one nn.CellList in its cell tree with vision_config.num_hidden_layers
    entries (CLIP: vision_model.encoder.layers; timm ViT: blocks)."""
    from mindspore import nn
    n = tower.cfg.num_hidden_layers
    stacks = [(name, c) for name, c in tower.cells_and_names() if isinstance(c, nn.CellList) and len(c) == n]
    if len(stacks) != 1:
        raise ValueError(f"{type(tower).__name__}: expected one CellList of {n} encoder layers, found "
                         f"{[name for name, _ in stacks] or 'none'}")
    return stacks[0][1]


def tower_taps(tower) -> List[Tap]:
    """Rows of any registered tower: `vit.embeddings` (a cell named `embeddings`, else what the first layer
    receives), `vit.pre_layrnorm` (when the tower has a cell of that name, as CLIP), `vit.layers.{j}`."""
    layers = layer_stack(tower)
    named = {}
    for name, cell in tower.cells_and_names():
        named.setdefault(name.rsplit(".", 1)[-1], cell)
    taps: List[Tap] = []
    if "embeddings" in named:
        taps.append(("vit.embeddings", named["embeddings"], OUTPUT))
    else:
        taps.append(("vit.embeddings", layers[0], INPUT))
    if "pre_layrnorm" in named:
        taps.append(("vit.pre_layrnorm", named["pre_layrnorm"], OUTPUT))
    taps += [(f"vit.layers.{j}", layer, OUTPUT) for j, layer in enumerate(layers)]
    return taps


def llm_taps(lm) -> List[Tap]:
    """Rows of each decoder layer j: `llm.layers.{j}.attention` (the attention cell's output),
    `llm.layers.{j}.mlp` (the feed-forward cell's) and `llm.layers.{j}` (the layer's)."""
    taps: List[Tap] = []
    for j, layer in enumerate(lm.model.layers):
        taps += [(f"llm.layers.{j}.attention", layer.attention, OUTPUT),
                 (f"llm.layers.{j}.mlp", layer.feed_forward, OUTPUT),
                 (f"llm.layers.{j}", layer, OUTPUT)]
    return taps

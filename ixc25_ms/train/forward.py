"""The training forward on MindSpore: ViT -> layout table -> projector -> embeddings -> LLM -> cross-entropy."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..dtypes import np_dtype
from ..vision.encode import tower_features
from .batch import Batch
from .labels import IGNORE

LABEL_BUCKET = 64  # trained positions are padded to a multiple of this (zero weight): fewer compiled shapes


class TrainForward(nn.Cell):
    """loss(batch) of an InternLMXComposer2ForCausalLM, the official training forward in one differentiable call.

    Image tokens: the ViT features of every view (global + crops of every image of the batch) are 2x2-merged
    into a table of rows, `plora_sub_GN` and `plora_glb_GN` appended, the projector applied row-wise, and each
    image position gathers its row (the official layout as gather indices, see batch.layout_rows); text
    positions take their token embedding. The LLM runs uncached over the right-padded batch; the output head
    and the cross-entropy run on the trained positions only (the others contribute nothing to the loss) and
    the loss is their mean (torch's CrossEntropyLoss over labels != -100).

    vit_frozen=True: the caller runs the (frozen) ViT outside the gradient and passes its features in place of
    the views — the compiled step then holds no ViT at all (its attention scores were most of the step's
    memory); the result is the same."""

    def __init__(self, model, geometry, infer_mode: str = "base", vit_frozen: bool = False):
        super().__init__()
        self.model, self.geo, self.infer_mode, self.vit_frozen = model, geometry, infer_mode, vit_frozen

    def image_table(self, views):
        """(V, 3, R, R) views, or (V, G*G, C) ViT features when vit_frozen -> projected table (V*half^2 + 2, H):
        merged view tokens, then sub_GN, then glb_GN."""
        m = self.model
        feats = views if self.vit_frozen else m.vit(views)  # (V, G*G, C), CLS dropped, no post_layernorm
        v, _, c = feats.shape
        half = self.geo.half
        x = feats.reshape(v, half, 2, half, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(v * half * half, 4 * c)
        x = ops.cat([x, m.plora_sub_GN.reshape(1, 4 * c).astype(x.dtype), m.plora_glb_GN.reshape(1, 4 * c).astype(x.dtype)], 0)
        return m.vision_proj(x.astype(m.vision_proj[0].weight.dtype))

    def construct(self, ids, image_rows, im_bool, im_mask, views, cos, sin, attn_mask, label_pos, label_ids,
                  label_w):
        """ids/image_rows (B,L) int32; im_bool (B,L,1) bool; im_mask (B,L,1) 0/1 in the compute dtype; views
        (V,3,R,R) (or the ViT's features, see vit_frozen) or None; label_pos (N,) flat positions whose next token trains, label_ids (N,), label_w (N,)
        1 or 0 (bucket padding) -> mean cross-entropy."""
        m = self.model
        b, l = ids.shape
        h = m.model.tok_embeddings(ids)
        if views is not None:
            img = ops.gather(self.image_table(views), image_rows.reshape(-1), 0).reshape(b, l, -1)
            h = ops.select(ops.broadcast_to(im_bool, h.shape), img.astype(h.dtype), h)
        hidden = m.model(h, im_mask, cos, sin, attn_mask, self.infer_mode)
        hv = ops.gather(hidden.reshape(b * l, -1), label_pos, 0)
        logits = m.output(hv).astype(ms.float32)
        logp = ops.log_softmax(logits, -1)
        nll = -ops.gather_elements(logp, 1, label_ids.reshape(-1, 1)).reshape(-1)
        return (nll * label_w).sum() / label_w.sum()


def bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def vit_is_frozen(trainable_names) -> bool:
    """True when no ViT tensor trains (fix_vit, LoRA runs): the ViT can then run outside the gradient."""
    return not any(n.startswith("vit.") for n in trainable_names)


def forward_inputs(model, batch: Batch, label_bucket: int = LABEL_BUCKET, vit_frozen: bool = False,
                   use_jit: bool = False, dedupe: bool = True):
    """The host arrays of a Batch as the Tensors TrainForward takes (one pass; nothing read back later).
    vit_frozen: the views are replaced by the frozen ViT's features (TrainForward(vit_frozen=True)), equal views
    run once unless dedupe=False (a trained tower sees every view: its LoRA dropout draws a mask per view)."""
    b, l = batch.ids.shape
    dt = model.compute_dtype
    lab = batch.labels[:, 1:]
    pos_b, pos_t = np.nonzero(lab != IGNORE)  # position t predicts labels[t + 1]
    n = len(pos_b)
    if n == 0:
        raise ValueError("a micro-batch with no trained token")
    nb = bucket(n, label_bucket)
    label_pos = np.zeros(nb, np.int32)
    label_ids = np.zeros(nb, np.int32)
    label_w = np.zeros(nb, np.float32)
    label_pos[:n] = pos_b * l + pos_t
    label_ids[:n] = lab[pos_b, pos_t]
    label_w[:n] = 1.0
    _, cos, sin, mask, _ = model.sequence_inputs(b, l, None, batch.attention_mask, rope_len=batch.length or l)
    im = batch.im_mask[..., None]
    views = None if batch.views is None else batch.views.astype(np_dtype(dt))
    if views is not None:  # a frozen tower runs here, outside any gradient, one view per call (jit: one graph);
        # a view equal to an earlier one (a 1x1 crop grid's global view is its crop) runs once: the same bits
        views = tower_features(model.vit, views, use_jit, 1, dedupe) if vit_frozen else Tensor(views)
    return (Tensor(batch.ids.astype(np.int32)), Tensor(batch.image_rows.astype(np.int32)), Tensor(im),
            Tensor(im.astype(np_dtype(dt))), views, cos, sin, mask, Tensor(label_pos), Tensor(label_ids),
            Tensor(label_w))

"""One training micro-batch as host arrays: ids, labels, masks, ViT views and the image-token gather rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..prompt import IMAGE_ID, interleave
from ..vision.layout import expected_tokens, split_views
from ..vision.tower import IXC_GEOMETRY, ViewGeometry
from .data import DataError, Sample, image_sizes
from .labels import IGNORE, count_trained, mask_human_targets
from .transform import open_train_image, train_grid, train_transform

SUB_GN, GLB_GN = -1, -2  # placeholders in layout rows, resolved once the batch's view count is known


def layout_rows(v0: int, h: int, w: int, half: int) -> np.ndarray:
    """Rows of the merged-feature table for one image whose views are [global, crops...] starting at view v0:
    the official layout — global half x half + sub_GN per row, glb_GN, then the crops tiled (h*half) x (w*half)
    + sub_GN per row. Table row of (view v, r, c) = v * half^2 + r * half + c."""
    per = half * half
    g = (v0 * per + np.arange(per).reshape(half, half))
    g = np.concatenate([g, np.full((half, 1), SUB_GN)], 1).reshape(-1)
    rr, cc = np.meshgrid(np.arange(h * half), np.arange(w * half), indexing="ij")
    view = v0 + 1 + (rr // half) * w + (cc // half)
    loc = view * per + (rr % half) * half + (cc % half)
    loc = np.concatenate([loc, np.full((h * half, 1), SUB_GN)], 1).reshape(-1)
    return np.concatenate([g, [GLB_GN], loc]).astype(np.int64)


@dataclass
class Batch:
    """A micro-batch. ids (B,L) hold the pad id at image and pad positions (their embeddings are replaced or
    unused); image_rows (B,L) index the projected image-token table (text positions: 0); views (V,3,R,R)."""

    ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    im_mask: np.ndarray
    image_rows: np.ndarray
    views: Optional[np.ndarray]
    samples: List[Sample] = field(default_factory=list)
    text_only: bool = False

    length: int = 0  # the official sequence length (before any bucket padding)

    def padded(self, multiple: int, pad_id: int) -> "Batch":
        """The batch right-padded to a multiple of `multiple` positions (pad id, label IGNORE, attention 0), after
        the labels were made: the loss and every gradient are unchanged, and a compiled step sees fewer shapes."""
        b, l = self.ids.shape
        extra = -(-l // multiple) * multiple - l if multiple > 1 else 0
        if extra == 0:
            return self

        def pad(a, value):
            return np.concatenate([a, np.full((b, extra), value, a.dtype)], 1)
        return Batch(pad(self.ids, pad_id), pad(self.labels, IGNORE), pad(self.attention_mask, 0), pad(self.im_mask, False),
                     pad(self.image_rows, 0), self.views, self.samples, self.text_only, self.length or l)

    @property
    def n_trained(self) -> int:
        return count_trained(self.labels)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class Collator:
    """Builds micro-batches with the official semantics: batches holding an image follow `interleav_wrap`
    (labels on each sample's own id stream, right padding with the pad token, cut to min(longest, max_length));
    text-only batches follow `text2emb` (the tokenizer pads with the pad id — the EOS id — and truncates first,
    then labels are made from the padded ids, so a padded row trains its first pad as EOS: an official quirk)."""

    def __init__(self, tokenizer, max_length: int, hd_num: int = 18, geometry: ViewGeometry = IXC_GEOMETRY,
                 pad_id: Optional[int] = None):
        self.tok, self.max_length, self.hd_num, self.geo = tokenizer, int(max_length), int(hd_num), geometry
        self.eot = tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.eos_token_id if pad_id is None else pad_id  # InternLM2Tokenizer: pad '</s>'

    # -- planning (no pixels): prompts, labels and grids from the image headers ----------------------------
    def grids(self, sample: Sample) -> List[Tuple[int, int]]:
        return [train_grid(w, h, self.hd_num, self.geo.resolution) for w, h in image_sizes(sample)]

    def stream(self, sample: Sample, grids=None):
        """(id stream with IMAGE_ID at image positions, labels, grids of the images it holds) of one sample."""
        grids = self.grids(sample) if grids is None else grids
        prompt = interleave(self.tok, sample.text, len(sample.images), lambda i: expected_tokens(*grids[i], self.geo),
                            self.max_length, bos_on_empty_first=False)
        ids = prompt.ids()
        return ids, mask_human_targets(ids, self.eot, self.eos), grids[:prompt.num_images]

    def trained_tokens(self, sample: Sample) -> int:
        """Trained positions of a sample alone (0: the official would train on nothing and report loss 0)."""
        if not sample.images:
            ids = self._text_ids(sample)
            return count_trained(mask_human_targets(ids, self.eot, self.eos))
        _, labels, _ = self.stream(sample)
        return count_trained(labels[: self.max_length])

    def _text_ids(self, sample: Sample) -> np.ndarray:
        ids = np.asarray(self.tok(sample.text, add_special_tokens=True).input_ids, np.int64)
        return ids[: self.max_length]  # truncation=True, max_length

    # -- the batch ----------------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise ValueError("an empty micro-batch")
        if not any(s.images for s in samples):
            return self._text_batch(samples)
        return self._image_batch(samples)

    def _text_batch(self, samples) -> Batch:
        rows = [self._text_ids(s) for s in samples]
        l = max(len(r) for r in rows)
        ids = np.full((len(rows), l), self.pad, np.int64)
        am = np.zeros((len(rows), l), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], am[i, :len(r)] = r, 1
        labels = np.stack([mask_human_targets(r, self.eot, self.eos) for r in ids])
        zeros = np.zeros_like(ids)
        return Batch(ids, labels, am, zeros.astype(bool), zeros, None, list(samples), text_only=True)

    def _image_batch(self, samples) -> Batch:
        streams, views, v0 = [], [], 0
        for s in samples:
            ids, labels, grids = self.stream(s)
            rows = []  # layout rows of this sample's images, in prompt order
            for path, (h, w) in zip(s.images, grids):
                pv = self._pixels(s, path, (h, w))
                views.append(pv)
                rows.append(layout_rows(v0, h, w, self.geo.half))
                v0 += 1 + h * w
            streams.append((ids, labels, np.concatenate(rows) if rows else np.zeros(0, np.int64)))
        table = v0 * self.geo.half ** 2  # rows of the table: merged view tokens, then sub_GN, then glb_GN
        b, l = len(samples), min(max(len(ids) for ids, _, _ in streams), self.max_length)
        ids = np.full((b, l), self.pad, np.int64)
        labels = np.full((b, l), IGNORE, np.int64)
        am = np.zeros((b, l), np.int64)
        im = np.zeros((b, l), bool)
        image_rows = np.zeros((b, l), np.int64)
        for i, (sid, slab, rows) in enumerate(streams):
            n = min(len(sid), l)
            img = sid[:n] == IMAGE_ID
            ids[i, :n] = np.where(img, self.pad, sid[:n])
            labels[i, :n], am[i, :n], im[i, :n] = slab[:n], 1, img
            rows = np.where(rows == SUB_GN, table, np.where(rows == GLB_GN, table + 1, rows))
            image_rows[i, np.flatnonzero(img)] = rows[: int(img.sum())]
        view_arr = np.concatenate([split_views(pv, self.geo) for pv in views], 0)
        return Batch(ids, labels, am, im, image_rows, view_arr, list(samples))

    def _pixels(self, sample: Sample, path: str, grid) -> np.ndarray:
        try:
            pv = train_transform(open_train_image(path), self.hd_num, self.geo.resolution)
        except ValueError as e:
            raise DataError(f"{sample.where}: image {path!r}: {e}") from None
        got = (pv.shape[2] // self.geo.resolution, pv.shape[3] // self.geo.resolution)
        if got != tuple(grid):
            raise DataError(f"{sample.where}: image {path!r} decodes to a {got} crop grid, its header said {grid}")
        return pv

"""The KV cache: preallocated per-layer K/V Parameters written in place at one slot per step, with its own guard."""
from __future__ import annotations

import itertools
from typing import Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, ops

MASK_MIN = float(np.finfo(np.float32).min)
LAST_SLOT = "_ixc25_last_slot"  # attribute of a cache Parameter: the highest slot written into it
_CACHE_IDS = itertools.count(1)  # unique names for KV-cache Parameters


def prefill_mask(attention_mask: np.ndarray) -> np.ndarray:
    """(B, L) 0/1 padding mask -> (B, 1, L, L) additive fp32: causal, padded keys masked."""
    b, l = attention_mask.shape
    allowed = np.tril(np.ones((l, l), dtype=bool))[None] & (attention_mask > 0)[:, None, :]
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float32)[:, None]


def decode_mask(key_valid: np.ndarray) -> np.ndarray:
    """(B, C) 0/1 valid cache slots (the new slot included) -> (B, 1, 1, C) additive fp32."""
    return np.where(key_valid > 0, 0.0, MASK_MIN).astype(np.float32)[:, None, None, :]


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Official generate: cumsum(mask)-1, padded positions set to 1."""
    pos = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


def _as_params(tensors, last: int) -> Tuple[Parameter, ...]:
    """(B, kvh, C, d) tensors -> Parameters (B*kvh, C, d) (unique names) marked as holding slots up to `last`."""
    out = tuple(Parameter(t.reshape((-1,) + tuple(t.shape[-2:])), name=f"kv_cache_{next(_CACHE_IDS)}",
                          requires_grad=False) for t in tensors)
    for p in out:
        setattr(p, LAST_SLOT, last)
    return out


class KVCache:
    """K/V of every layer as (B*kvh, C, d) Parameters that decode steps append to in place (gpt-fast style),
    plus what the steps need on the host: the valid slots of each row (B, C), the position id of each row's
    last token (B,), and `offset`, the slot the next step writes (slots are appended in increasing order).

    Guard: each Parameter remembers the highest slot written into it, so appending at a written slot is an
    error — also through another KVCache object holding the same Parameters (alternating cache sets) or one
    reordered from them (beam search). The model keeps no reference: caches are freed with their last user."""

    def __init__(self, keys: Sequence[Parameter], values: Sequence[Parameter], key_valid: np.ndarray,
                 positions: np.ndarray, offset: int):
        self.keys, self.values = tuple(keys), tuple(values)
        self.key_valid = np.array(key_valid, np.int64)
        self.positions = np.array(positions, np.int64).reshape(-1)
        self.offset = int(offset)
        if len(self.keys) != len(self.values):
            raise ValueError(f"{len(self.keys)} key caches but {len(self.values)} value caches")

    @classmethod
    def from_prefill(cls, ks, vs, attention_mask: np.ndarray) -> "KVCache":
        """The (B, kvh, cap, d) tensors of a prefill over an (B, L) padding mask (left padding allowed)."""
        b, l = attention_mask.shape
        cap = int(ks[0].shape[2])
        key_valid = np.zeros((b, cap), np.int64)
        key_valid[:, :l] = attention_mask
        return cls(_as_params(ks, l - 1), _as_params(vs, l - 1), key_valid, attention_mask.sum(-1) - 1, l)

    @classmethod
    def from_arrays(cls, keys, values, key_valid: np.ndarray, positions, offset: int, dtype) -> "KVCache":
        """Caches given as (B, kvh, C, d) arrays/tensors: slots not valid in `key_valid` (and slot `offset`,
        which the next step adds into) are zeroed; slots below `offset` count as written."""
        def fresh(arrays):
            out = []
            for c in arrays:
                a = c.asnumpy() if isinstance(c, Tensor) else np.asarray(c)
                if a.ndim != 4:
                    raise ValueError(f"cache of shape {tuple(a.shape)} is not (B, kvh, C, d)")
                keep = np.asarray(key_valid).reshape(a.shape[0], -1)[:, : a.shape[2]] > 0
                keep[:, offset:offset + 1] = False
                out.append(Tensor(np.where(keep[:, None, :, None], a, 0).astype(a.dtype)).astype(dtype))
            return _as_params(out, offset - 1)
        return cls(fresh(keys), fresh(values), key_valid, positions, offset)

    @property
    def batch_size(self) -> int:
        return int(self.key_valid.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1])

    def check(self, layers: int, kv_heads: int, head_dim: int, dtype) -> None:
        """Raises ValueError when the caches do not fit the model or the next slot is taken or out of range."""
        b = self.batch_size
        if len(self.keys) != layers:
            raise ValueError(f"expected {layers} caches (one per layer), got {len(self.keys)}")
        for c in self.keys + self.values:
            if len(c.shape) != 3 or c.shape[0] != b * kv_heads or c.shape[2] != head_dim:
                raise ValueError(f"cache of shape {tuple(c.shape)} is neither a prefill cache nor built from "
                                 f"(B, kvh, C, d) arrays for this model: (B*kvh, C, d) = ({b * kv_heads}, C, {head_dim})")
            if c.dtype != dtype:
                raise ValueError(f"cache dtype {c.dtype} differs from the compute dtype {dtype}")
        if not 0 <= self.offset < self.capacity:
            raise ValueError(f"cache slot {self.offset} is outside the cache capacity {self.capacity}")
        last = max(getattr(p, LAST_SLOT, -1) for p in self.keys + self.values)
        if self.offset <= last:
            raise ValueError(f"cache slot {self.offset} of these caches is already written (they hold slots up to "
                             f"{last}: the prompt or an earlier decode step); decode appends, one new slot per step")

    def begin_step(self) -> Tuple[int, np.ndarray]:
        """The slot this step writes and the position id of its token per row; marks the slot valid."""
        self.key_valid[:, self.offset] = 1
        return self.offset, self.positions + 1

    def end_step(self) -> None:
        for p in self.keys + self.values:
            setattr(p, LAST_SLOT, self.offset)
        self.positions = self.positions + 1
        self.offset += 1

    def reorder(self, index) -> "KVCache":
        """Beam search: a new cache (same batch size) whose row i is row index[i] of this one (this one is
        left as it was)."""
        index = np.asarray(index, np.int64).reshape(-1)
        b = len(index)
        idx = Tensor(index.astype(np.int32))

        def rows(caches):
            out = []
            for c in caches:
                n = int(c.shape[0])
                if n % b:
                    raise ValueError(f"cache with {n} rows does not split into {b} batch rows")
                out.append(ops.gather(c.reshape((b, n // b) + tuple(c.shape[1:])), idx, 0))
            return _as_params(out, max(getattr(c, LAST_SLOT, -1) for c in caches))
        if b != self.batch_size:
            raise ValueError(f"reorder index has {b} entries for a cache of {self.batch_size} batch rows")
        return KVCache(rows(self.keys), rows(self.values), self.key_valid[index], self.positions[index], self.offset)

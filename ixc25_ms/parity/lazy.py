"""Checkpoint weights read on demand for the parity tool: one tensor in memory at a time, any layout."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, Optional, Sequence

import numpy as np


class LazyArray:
    """A tensor of a checkpoint read on demand: `.shape` from the source, data (floats as float32) via np.asarray()."""

    def __init__(self, source, key: str):
        self._source, self._key = source, key
        self.shape = tuple(source.shape(key))

    def __array__(self, dtype=None, copy=None):
        arr = self._source.read(self._key, np.float32)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    @property
    def ndim(self):
        return len(self.shape)


class LazyWeights(Mapping):
    """{official key: LazyArray} over a checkpoint of any layout (ixc25_ms.weights.layout.open_weights).

    `overrides` replaces (or adds) entries with in-memory arrays, e.g. a deliberately corrupted weight."""

    def __init__(self, path: str, overrides: Optional[Mapping] = None, allow_pickle: bool = False):
        from ixc25_ms.weights.layout import open_weights
        self.path = path
        source = open_weights(path, allow_pickle)
        self._items: Dict[str, object] = {k: LazyArray(source, k) for k in source.keys()}
        for k, v in (overrides or {}).items():
            self._items[k] = v

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def only(self, prefixes: Sequence[str]) -> Dict[str, object]:
        return {k: v for k, v in self._items.items() if k.startswith(tuple(prefixes))}

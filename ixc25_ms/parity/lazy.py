"""Checkpoint weights read on demand for the parity tool: one safetensors tensor in memory at a time."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Iterator, Optional, Sequence

import numpy as np


class LazyArray:
    """A tensor of a safetensors file read on demand: `.shape` from the header, data via np.asarray()."""

    def __init__(self, st, key: str):
        self._st, self._key = st, key
        self.shape = tuple(st.shape(key))

    def __array__(self, dtype=None, copy=None):
        arr = self._st.read(self._key, np.float32)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    @property
    def ndim(self):
        return len(self.shape)


class LazyWeights(Mapping):
    """{official key: LazyArray} over the safetensors files of a checkpoint directory.

    `overrides` replaces (or adds) entries with in-memory arrays, e.g. a deliberately corrupted weight.
    Directories holding .bin files or our converted layout are read eagerly (ixc25_ms.model.read_weights)."""

    def __init__(self, path: str, overrides: Optional[Mapping] = None, allow_pickle: bool = False):
        from ixc25_ms.checkpoint import CheckpointError, SafetensorsFile, list_weight_files
        from ixc25_ms.ms_checkpoint import is_converted_dir
        self.path = path
        self._items: Dict[str, object] = {}
        files = [] if (os.path.isdir(path) and is_converted_dir(path)) else list_weight_files(path, allow_pickle)
        if files and all(f.endswith(".safetensors") for f in files):
            for fn in files:
                st = SafetensorsFile(fn)
                for k in st.keys():
                    if k in self._items:
                        raise CheckpointError(f"{fn}: key '{k}' appears in more than one file")
                    self._items[k] = LazyArray(st, k)
        else:
            from ixc25_ms.model import read_weights
            self._items.update(read_weights(path, allow_pickle))
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

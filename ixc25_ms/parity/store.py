"""The parity tool's activation store: one .npy per captured row, in capture order, plus a manifest."""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np


class ActivationStore:
    """Saves activations as numbered .npy files and a manifest (name, file, shape, dtype) in a directory."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.rows: List[dict] = []
        self.meta: dict = {}

    def save(self, name: str, value) -> None:
        """Write `value` (a MindSpore Tensor or anything np.asarray takes) as the next row `name`."""
        arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        fn = f"{len(self.rows):04d}_{name.replace('/', '_')}.npy"
        np.save(os.path.join(self.root, fn), arr)
        self.rows.append({"name": name, "file": fn, "shape": list(arr.shape), "dtype": str(arr.dtype)})

    def load(self, name: str) -> np.ndarray:
        """The saved array of row `name` (KeyError if it was not captured)."""
        for r in self.rows:
            if r["name"] == name:
                return np.load(os.path.join(self.root, r["file"]))
        raise KeyError(name)

    def write_manifest(self) -> None:
        """manifest.json: the rows and `meta` (written under a temporary name, then renamed)."""
        path = os.path.join(self.root, "manifest.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rows": self.rows, "meta": self.meta}, f, indent=1)
        os.replace(path + ".tmp", path)

    @classmethod
    def open(cls, root: str) -> "ActivationStore":
        """A store over a directory written earlier (its manifest read back)."""
        s = cls(root)
        with open(os.path.join(root, "manifest.json")) as f:
            d = json.load(f)
        s.rows, s.meta = d["rows"], d["meta"]
        return s

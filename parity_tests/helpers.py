"""Paths of the test data, and the tiny-model helpers of ixc25_ms.testing under the names the tests use."""
from __future__ import annotations

import os

import numpy as np

from ixc25_ms.config import IXCConfig
from ixc25_ms.testing.synthetic import random_lm_state  # noqa: F401
from ixc25_ms.testing.tester import VISION_PREFIXES, TinyModelTester, build_ms_lm, tiny_config  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "tests", "data", "official-tiny")


def load_golden():
    """(config, state dict, expected tensors) of the official tiny golden case."""
    from ixc25_ms.weights.layout import load_state_dict
    cfg = IXCConfig.from_file(GOLDEN)
    return cfg, load_state_dict(GOLDEN), dict(np.load(os.path.join(GOLDEN, "expected.npz")))

"""Shared pytest setup: MindSpore on CPU, and a clean error state between tests."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only


@pytest.fixture(autouse=True)
def _mindspore_clean_state():
    """MindSpore 2.10 re-raises a failed op's error once on the next op; clear it around every test."""
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.runtime.synchronize()
    except Exception:
        pass
    yield
    try:
        ms.runtime.synchronize()
    except Exception:
        pass

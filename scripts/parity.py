"""ixc25-parity console script: MindSpore port vs our PyTorch reference, module by module.

Usage: ixc25-parity --model DIR [--image A.png ...] [--query TEXT] [--dtype fp32|fp16]
                    [--mode pynative|graph] [--report out.json|out.md] [--tolerance-table FILE] [--steps N]
The logic lives in the ixc25_ms.parity package (see notes/parity-tool.md)."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("GLOG_v", "3")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ixc25_ms.parity.cli import main as _main
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Change a Megatron checkpoint's TP/PP size (thin wrapper over `megatron-prune reshard`).

    python tools/checkpoint_conversion/reshard.py --input MG --output MG_TP4 --tp 4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reshard", *sys.argv[1:]]))

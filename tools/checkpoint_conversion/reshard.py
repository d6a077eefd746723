#!/usr/bin/env python3
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Change a Megatron checkpoint's TP/PP size: python tools/checkpoint_conversion/reshard.py --help
(see megatron/prune/seed/convert.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("reshard"))

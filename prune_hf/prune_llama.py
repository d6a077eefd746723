#!/usr/bin/env python3
"""Prune an HF checkpoint to the shape of a JSON config: `python prune_hf/prune_llama.py --help` (the seed project's path and flags; see ``megatron/prune/seed.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.prune.seed import prune_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(prune_hf())

#!/usr/bin/env python3
"""Prune a Megatron (or HF) checkpoint with the seed's flags: `python prune_llama.py --help` (the seed project's path and flags; see ``megatron/prune/seed.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron.prune.seed import prune_llama  # noqa: E402

if __name__ == "__main__":
    sys.exit(prune_llama())

#!/usr/bin/env python3
"""Prune the vocabulary of an HF model folder: `python emb_pruner/prune_spm_and_emb.py --help` (the seed project's path and flags; see ``megatron/prune/seed.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.prune.seed import prune_spm_and_emb  # noqa: E402

if __name__ == "__main__":
    sys.exit(prune_spm_and_emb())

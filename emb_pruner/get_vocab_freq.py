#!/usr/bin/env python3
"""Token frequencies of a corpus and the ids to keep: `python emb_pruner/get_vocab_freq.py --help` (the seed project's path and flags; see ``megatron/prune/seed.py``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.prune.seed import get_vocab_freq  # noqa: E402

if __name__ == "__main__":
    sys.exit(get_vocab_freq())

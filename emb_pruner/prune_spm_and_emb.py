#!/usr/bin/env python3
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Prune the vocabulary of an HF model folder (the seed project's flags):
python emb_pruner/prune_spm_and_emb.py --help (see megatron/prune/seed/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("prune_spm_and_emb"))

#!/usr/bin/env python3
''''exec bash "${0%.py}.sh" "$@"  # started with bash, as the seed's README does: run the .sh beside it '''
"""Prune the vocabulary of an HF model folder, at the seed's path: python prune_spm_and_emb.py --help,
or bash prune_spm_and_emb.sh (see megatron/prune/seed/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("prune_spm_and_emb"))

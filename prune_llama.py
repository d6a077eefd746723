#!/usr/bin/env python3
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Prune a Megatron (or HF) checkpoint with the seed project's flags: python prune_llama.py --help
(see megatron/prune/seed/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("prune_llama"))

#!/usr/bin/env python3
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Megatron-LM checkpoint -> HF safetensors: python tools/checkpoint_conversion/megatron_to_hf.py --help
(see megatron/prune/seed/convert.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.seed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("megatron_to_hf"))

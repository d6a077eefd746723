#!/usr/bin/env python3
"""Megatron-LM torch checkpoint -> HF safetensors (thin wrapper over `megatron-prune convert megatron-to-hf`).

    python tools/checkpoint_conversion/megatron_to_hf.py --input MG --output HF
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))

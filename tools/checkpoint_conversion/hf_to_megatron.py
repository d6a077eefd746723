#!/usr/bin/env python3
"""HF safetensors -> Megatron-LM torch checkpoint (thin wrapper over `megatron-prune convert hf-to-megatron`).

    python tools/checkpoint_conversion/hf_to_megatron.py --input HF --output MG --tp 2 --pp 1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))

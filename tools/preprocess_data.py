#!/usr/bin/env python
"""Megatron-style entry point for ``megatron-prune data``: text → ``PREFIX_text_document.bin/.idx``.

  python tools/preprocess_data.py --input FILE.jsonl --output-prefix PREFIX --tokenizer DIR_OR_SPM [--workers N]
"""

import sys

from megatron.prune.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))

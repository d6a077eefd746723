#!/usr/bin/env python
''''exec "${PYTHON:-python}" "$0" "$@"  # also when started with bash: run this file with Python '''
"""Megatron-style entry point for ``megatron-prune data``: one text file → ``PREFIX_text_document.bin/.idx``.

  python tools/preprocess_data.py --input FILE.jsonl --output-prefix PREFIX --tokenizer DIR_OR_SPM [--workers N]

Input is one UTF-8 file (BOM fine): JSON lines (.jsonl/.json/.ndjson, a 'text' field per line) or plain text
(.txt/.text/.md, blank-line separated documents), optionally .gz; other names are sniffed; --input-format
overrides. Megatron-LM's --tokenizer-model, --tokenizer-type, --json-keys KEY (writes PREFIX_KEY_document),
--append-eod, --keep-newlines, --log-interval and --dataset-impl mmap are accepted; --split-sentences and
--partitions are refused. See --help.
"""

import sys

from megatron.prune.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))

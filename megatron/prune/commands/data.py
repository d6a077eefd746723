"""Tokenize jsonl (``text`` field) or plain text (blank-line separated documents) into a Megatron
indexed dataset ``PREFIX_text_document.bin/.idx``, with the model's own tokenizer and one EOD
(the tokenizer's EOS) after each document. Pass the printed ``PREFIX_text_document`` as ``DATA``
to ``scripts/check_model.sh`` / ``--data-path`` of ``pretrain_llama.py``.

Example:
  megatron-prune data --input corpus.jsonl --output-prefix data/corpus --tokenizer pruned/ --workers 4
"""

from __future__ import annotations

import argparse

HELP = "tokenize text into a Megatron indexed dataset (.bin/.idx) for recovery training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="FILE.jsonl (a 'text' field per line) or FILE.txt")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_text_document.bin and PREFIX_text_document.idx")
    parser.add_argument("--tokenizer", required=True,
                        help="HF tokenizer folder (e.g. the model folder) or a SentencePiece .model")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data import preprocess

    s = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                   overwrite=args.overwrite, progress=not args.no_progress)
    prefix = str(s.bin_path)[: -len(".bin")]
    print(f"documents: {s.documents}")
    print(f"tokens: {s.tokens}")
    print(f"dataset prefix: {prefix}")
    return 0

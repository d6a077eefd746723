"""Tokenize one text file into a Megatron indexed dataset ``PREFIX_text_document.bin/.idx``, with the
model's own tokenizer and one EOD (the tokenizer's EOS) after each document. Pass the printed
``PREFIX_text_document`` as ``DATA`` to ``scripts/check_model.sh`` / ``--data-path`` of ``pretrain_llama.py``.

Input: one file (not a folder, several files or a glob), UTF-8 (a leading BOM is fine), gunzipped on the
fly if it ends in .gz (the suffix before .gz then names the format). Formats (--input-format auto):
  JSON lines   .jsonl .json .ndjson (any case): one object per line, the document in its "text" field
               (a field of only whitespace is no document, as blank lines in plain text are none)
  plain text   .txt .text .md (any case): documents separated by blank lines, newlines inside kept
  other names: JSON lines if the first non-blank line is a JSON object, else plain text
The summary names the format used; --input-format jsonl|text overrides the choice.

Output: PREFIX_text_document.bin/.idx (PREFIX_KEY_document with --json-keys KEY), written to temp files
renamed into place at the end; an existing dataset is only replaced with --overwrite.

Megatron-LM tools/preprocess_data.py flags also accepted: --tokenizer-model (= --tokenizer),
--tokenizer-type (checked against the path), --json-keys (one key), --append-eod, --keep-newlines,
--log-interval, --dataset-impl mmap. Refused: --split-sentences, --partitions.

Example:
  megatron-prune data --input corpus.jsonl.gz --output-prefix data/corpus --tokenizer pruned/ --workers 4
"""

from __future__ import annotations

import argparse

from megatron.prune.data import INPUT_FORMATS, MEGATRON_TOKENIZER_TYPES

HELP = "tokenize text into a Megatron indexed dataset (.bin/.idx) for recovery training"


class RefusedFlag(argparse.Action):
    """A Megatron-LM flag this command does not support: a parse error, under this command's usage, saying what
    to do instead (rather than the top-level "unrecognized arguments")."""

    def __init__(self, option_strings: list[str], dest: str, instead: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=f"not supported: {instead}", **kwargs)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not supported: {self.instead}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="one file: FILE.jsonl (a 'text' field per line) or FILE.txt, optionally .gz "
                             "(no folders, lists or globs: concatenate, or run once per file)")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="auto (default): by suffix, else sniffed from the first non-blank line")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_text_document.bin and PREFIX_text_document.idx (e.g. data/corpus)")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        help="HF tokenizer folder (e.g. the model folder) or a SentencePiece .model "
                             "(--tokenizer-model: Megatron-LM's name for it)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    megatron = parser.add_argument_group("Megatron-LM compatible flags")
    megatron.add_argument("--tokenizer-type", choices=list(MEGATRON_TOKENIZER_TYPES), metavar="TYPE",
                          help=f"optional, checked against --tokenizer: {', '.join(MEGATRON_TOKENIZER_TYPES)} "
                               f"(HuggingFaceTokenizer needs a folder, the others a .model file)")
    megatron.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                          help="read this JSON field instead of 'text' and write PREFIX_KEY_document "
                               "(one key per run)")
    megatron.add_argument("--append-eod", action="store_true", help="accepted, no effect: EOD is always appended")
    megatron.add_argument("--keep-newlines", action="store_true",
                          help="accepted, no effect: newlines inside documents are always kept")
    megatron.add_argument("--log-interval", type=int, metavar="N",
                          help="accepted, ignored: a progress bar shows progress")
    megatron.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                          help="accepted: mmap is the only format written")
    megatron.add_argument("--split-sentences", action=RefusedFlag, nargs=0,
                          instead="documents are tokenized whole; split them into documents before this command")
    megatron.add_argument("--partitions", action=RefusedFlag, metavar="N",
                          instead="use --workers N to tokenize in parallel")


def run(args: argparse.Namespace) -> int:
    from megatron.prune.data import preprocess
    from megatron.prune.errors import PruneError

    if len(args.json_keys) != 1:
        raise PruneError(f"--json-keys {' '.join(args.json_keys)}: one key per run; run once per key "
                         f"(each writes its own PREFIX_KEY_document)")
    s = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                   overwrite=args.overwrite, progress=not args.no_progress, input_format=args.input_format,
                   json_key=args.json_keys[0], tokenizer_type=args.tokenizer_type)
    prefix = str(s.bin_path)[: -len(".bin")]
    print(f"format: {s.input_format}")
    print(f"documents: {s.documents}")
    print(f"tokens: {s.tokens}")
    print(f"dataset prefix: {prefix}")
    return 0

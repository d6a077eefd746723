"""Prune the vocabulary of a model (or of a tokenizer alone) to the tokens a domain uses.

  megatron-prune vocab count --tokenizer DIR --data FILES... --output counts.json
  megatron-prune vocab prune --input MODEL --output MODEL2 (--keep N | --keep-ids FILE | --like TOKENIZER)
                             [--counts counts.json]

MODEL is an HF folder, a Megatron checkpoint (tokenizer in hf_meta/; every shard rewritten at its TP/PP with
the vocabulary padding recomputed) or a folder holding only a tokenizer.

Special tokens and the fallback alphabet (byte symbols, <0x00>..<0xFF> or unk) are always kept, so any text
still encodes; in-domain text keeps exactly its tokens. --keep N is the final vocabulary size. A folder with a
config.json is a model (embedding and output rows are sliced, config special ids renumbered).

--like TOKENIZER keeps exactly the tokens of a vocabulary pruned from MODEL's, in its numbering: e.g. the
unpruned teacher of a vocabulary-pruned student, so that distillation compares the same token ids (the teacher's
logits over those tokens are unchanged; its softmax is renormalised over them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "count token frequencies / prune the vocabulary (tokenizer + embeddings)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_verb", metavar="<count|prune>", required=True)
    c = sub.add_parser("count", help="token frequencies over text / JSON-lines files", description=count.__doc__)
    c.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json or tokenizer.model")
    c.add_argument("--data", type=Path, nargs="+", required=True,
                   help="files read as `megatron-prune data` reads them: JSON lines ('text' field) or plain text, "
                        "optionally .gz")
    c.add_argument("--output", type=Path, required=True, help="counts file to write (JSON)")
    c.add_argument("--workers", type=int, default=0, help="processes; 0: min(4, CPUs) (default 0)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing counts file")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(_vocab_run=count)

    p = sub.add_parser("prune", help="write a model / tokenizer with a smaller vocabulary", description=prune.__doc__)
    p.add_argument("--input", type=Path, required=True,
                   help="HF model folder, Megatron checkpoint, or tokenizer folder")
    p.add_argument("--output", type=Path, required=True, help="new folder for the pruned model/tokenizer")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=int,
                   help="final vocabulary size: the most frequent tokens by --counts (lowest ids without counts)")
    g.add_argument("--keep-ids", type=Path, help="file of token ids to keep (JSON list or whitespace-separated)")
    g.add_argument("--like", type=Path, metavar="TOKENIZER",
                   help="keep exactly this tokenizer's tokens (one `vocab prune` made from the input's): a "
                        "tokenizer folder, tokenizer.model, or a pruned HF model / Megatron checkpoint")
    p.add_argument("--counts", type=Path, help="counts file from `vocab count` (ranks tokens for --keep)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_vocab_run=prune)


def count(args: argparse.Namespace) -> int:
    """Count token frequencies of a corpus with a tokenizer; the file remembers which tokenizer."""
    from megatron.prune.errors import PruneError
    from megatron.prune.io.atomic import check_writable_parent
    from megatron.prune.io.workers import check_workers
    from megatron.prune.vocab import count_tokens, open_tokenizer

    if args.output.is_dir():
        raise PruneError(f"--output {args.output} is a folder; give a file name such as counts.json")
    if not args.output.parent.is_dir():
        check_writable_parent(args.output, "--output")  # a file on the way says so
        raise PruneError(f"--output folder {args.output.parent} does not exist")
    if args.output.exists() and not args.overwrite:
        raise PruneError(f"--output {args.output} exists; pass --overwrite to replace it")
    check_writable_parent(args.output, "--output")
    check_workers(args.workers, least=0)  # 0: min(4, CPUs)
    tf = open_tokenizer(args.tokenizer)
    counts = count_tokens(args.tokenizer, args.data, tf.rules, args.workers, progress=not args.no_progress)
    counts.save(args.output)
    used = sum(1 for c in counts.counts if c)
    print(f"{counts.num_tokens} tokens, {used} of {counts.vocab_size} ids used ({tf.kind}) -> {args.output}")
    return 0


def prune(args: argparse.Namespace) -> int:
    """Prune the vocabulary of a model or a tokenizer folder."""
    from megatron.prune.errors import PruneError
    from megatron.prune.formats.folder import model_kind
    from megatron.prune.vocab import TokenCounts, prune_hf_vocab, prune_megatron_vocab, prune_tokenizer, read_keep_ids

    if not args.input.is_dir():
        raise PruneError(f"--input {args.input} is not a folder")
    if args.counts is not None and args.keep is None:
        given = "--keep-ids" if args.keep_ids is not None else "--like"
        raise PruneError(f"--counts {args.counts} ranks tokens for --keep only; {given} names the kept tokens itself "
                         "(drop --counts, or use --keep N with it)")
    counts = TokenCounts.load(args.counts) if args.counts else None
    keep_ids = read_keep_ids(args.keep_ids) if args.keep_ids else None
    like = like_tokens(args.like) if args.like else None
    kind = model_kind(args.input)
    if kind == "megatron":
        plan = prune_megatron_vocab(args.input, args.output, args.keep, keep_ids, counts, args.overwrite,
                                    progress=not args.no_progress, like=like)
        print(f"vocabulary {plan.source.vocab_size} -> {plan.target.vocab_size} (Megatron) -> {args.output}")
    elif kind == "hf":
        plan = prune_hf_vocab(args.input, args.output, args.keep, keep_ids, counts, args.overwrite,
                              progress=not args.no_progress, like=like)
        s, t = plan.source, plan.target
        print(f"vocabulary {s.vocab_size} -> {t.vocab_size}; parameters {s.num_params()} -> {t.num_params()} "
              f"-> {args.output}")
    else:
        kept = prune_tokenizer(args.input, args.output, args.keep, keep_ids, counts, args.overwrite, like=like)
        print(f"tokenizer pruned to {len(kept)} tokens -> {args.output}")
    return 0


def like_tokens(path: Path) -> tuple[str, ...]:
    """The tokens of --like: a tokenizer folder or file, an HF model folder, or a Megatron checkpoint's hf_meta/."""
    from megatron.prune.errors import PruneError
    from megatron.prune.formats.folder import as_model_folder
    from megatron.prune.formats.mcore.schema import META_DIR
    from megatron.prune.vocab.folder import tokenizer_tokens

    if not path.exists():
        raise PruneError(f"--like {path}: no such file or folder")
    tokens = tokenizer_tokens(as_model_folder(path).tokenizer_dir)
    if tokens is None:
        raise PruneError(f"--like {path}: no tokenizer there (tokenizer.json or tokenizer.model; for a Megatron "
                         f"checkpoint, in {META_DIR}/)")
    return tokens


def run(args: argparse.Namespace) -> int:
    return args._vocab_run(args)

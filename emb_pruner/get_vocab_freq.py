#!/usr/bin/env python3
r"""Seed-compatible token counting: frequencies over a corpus and the ids of the N most frequent tokens.

    python emb_pruner/get_vocab_freq.py --data_type txt --data_path corpus.txt --spm MODEL/tokenizer.model \
        --vocab_freq vocab_freq --remain_vocab_size 15000 --remain_vocab_ids_path remain_vocab_ids.pt

Writes ``<vocab_freq>.txt`` ("id count" lines, most frequent first), ``<vocab_freq>.json`` (the counts file
of `megatron-prune vocab count`, which remembers the tokenizer) and the kept ids. Unlike the seed, the kept
ids already include the special tokens, the byte/unk fallback and every merge intermediate a kept token
needs (exactly --remain_vocab_size of them). --spm may also be a folder with a tokenizer.json (BPE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_type", default="txt", help="txt or jsonl (the seed's mmap is not supported)")
    p.add_argument("--data_path", nargs="+", required=True)
    p.add_argument("--spm", required=True, help="tokenizer.model / tokenizer.json, or the folder holding it")
    p.add_argument("--vocab_freq", default="vocab_freq", help="prefix of the frequency files")
    p.add_argument("--remain_vocab_size", type=int, default=20000)
    p.add_argument("--remain_vocab_ids_path", default="remain_vocab_ids.pt", help=".pt (torch list) or .json")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--model_name", default="llama", help="ignored (kept for the seed's scripts)")
    a = p.parse_args(argv)

    from megatron.prune.shape import PruneError
    from megatron.prune.vocab import choose_kept, count_tokens, open_tokenizer

    try:
        if a.data_type not in ("txt", "jsonl"):
            raise PruneError(f"--data_type {a.data_type!r} is not supported; choose txt or jsonl")
        tok_dir = Path(a.spm) if Path(a.spm).is_dir() else Path(a.spm).parent
        tf = open_tokenizer(tok_dir)
        counts = count_tokens(tok_dir, a.data_path, tf.rules, a.workers)
        kept = choose_kept(tf.rules, keep=a.remain_vocab_size, counts=counts)
        counts.save(Path(f"{a.vocab_freq}.json"))
        order = sorted(range(counts.vocab_size), key=lambda i: (-counts.counts[i], i))
        Path(f"{a.vocab_freq}.txt").write_text("".join(f"{i} {counts.counts[i]}\n" for i in order))
        save_ids(list(kept), Path(a.remain_vocab_ids_path))
    except PruneError as e:
        print(f"get_vocab_freq: error: {e}", file=sys.stderr)
        return 2
    print(f"kept {len(kept)} of {tf.rules.size} token ids -> {a.remain_vocab_ids_path}")
    return 0


def save_ids(ids: list[int], path: Path) -> None:
    if path.suffix == ".pt":
        import torch

        torch.save(ids, path)
    else:
        path.write_text(json.dumps(ids))


if __name__ == "__main__":
    sys.exit(main())

r"""The seed's vocabulary pruning (``emb_pruner/``): ``get_vocab_freq.py`` counts token frequencies and picks the ids
to keep, ``prune_spm_and_emb.py`` prunes an HF model's tokenizer and embedding / lm_head rows to them. Both run the
code of ``megatron-prune vocab count`` / ``vocab prune``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from megatron.prune.errors import PruneError
from megatron.prune.seed.verbs import OneLineParser, seed_words

# ---- get_vocab_freq.py ------------------------------------------------------------------------------------------

GET_VOCAB_FREQ_USAGE = r"""Seed-compatible token counting: frequencies over a corpus and the ids of the N most frequent
tokens.

    python get_vocab_freq.py --data_type txt --data_path corpus.txt --spm MODEL/tokenizer.model \
        --vocab_freq vocab_freq --remain_vocab_size 15000 --remain_vocab_ids_path remain_vocab_ids.pt

Writes <vocab_freq>.txt ("id count" lines, most frequent first), <vocab_freq>.json (the counts file of
`megatron-prune vocab count`, which remembers the tokenizer) and the kept ids. Unlike the seed, the kept ids
already include the special tokens, the byte/unk fallback and every merge intermediate a kept token needs
(exactly --remain_vocab_size of them). --spm may also be a folder with a tokenizer.json (BPE).
"""


def get_vocab_freq(argv: list[str] | None = None) -> int:
    """``emb_pruner/get_vocab_freq.py``."""
    prog = "get_vocab_freq.py"
    p = OneLineParser(prog=prog, description=GET_VOCAB_FREQ_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data_type", default="txt", help="txt or jsonl (the seed's mmap is not supported)")
    p.add_argument("--data_path", nargs="+", required=True, help="corpus file(s)")
    p.add_argument("--spm", required=True, help="tokenizer.model / tokenizer.json, or the folder holding it")
    p.add_argument("--vocab_freq", default="vocab_freq", help="prefix of the frequency files (default %(default)s)")
    p.add_argument("--remain_vocab_size", type=int, default=20000, help="ids to keep (default %(default)s)")
    p.add_argument("--remain_vocab_ids_path", default="remain_vocab_ids.pt",
                   help=".pt (torch list) or .json (default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: min(4, CPUs))")
    p.add_argument("--model_name", default="llama", help="ignored (kept for the seed's scripts)")
    p.add_argument("--new_spm_path", help="ignored (kept for the seed's scripts)")
    a = p.parse_args(argv)

    from megatron.prune.vocab import choose_kept, count_tokens, open_tokenizer
    from megatron.prune.vocab.rules import check_keep

    try:
        if a.data_type not in ("txt", "jsonl"):
            raise PruneError(f"--data_type {a.data_type!r} is not supported; choose txt or jsonl")
        check_output_files(f"{a.vocab_freq}.json", f"{a.vocab_freq}.txt", a.remain_vocab_ids_path)
        tok_dir = Path(a.spm) if Path(a.spm).is_dir() else Path(a.spm).parent
        tf = open_tokenizer(tok_dir)
        check_keep(a.remain_vocab_size, tf.rules)  # before the counting pass
        counts = count_tokens(tok_dir, a.data_path, tf.rules, a.workers)
        kept = choose_kept(tf.rules, keep=a.remain_vocab_size, counts=counts)
        counts.save(Path(f"{a.vocab_freq}.json"))
        order = sorted(range(counts.vocab_size), key=lambda i: (-counts.counts[i], i))
        Path(f"{a.vocab_freq}.txt").write_text("".join(f"{i} {counts.counts[i]}\n" for i in order))
        save_ids(list(kept), Path(a.remain_vocab_ids_path))
    except (PruneError, OSError) as e:  # OSError: a full disk, a read-only filesystem
        print(f"{prog}: error: {seed_words(str(e), {'--keep': '--remain_vocab_size'})}", file=sys.stderr)
        return 2
    print(f"kept {len(kept)} of {tf.rules.size} token ids -> {a.remain_vocab_ids_path}")
    return 0


def check_output_files(*paths: Path | str) -> None:
    """The seed scripts' output files can be written (their folder exists and takes files), before any work."""
    from megatron.prune.io.atomic import check_writable_parent

    for path in paths:
        folder = Path(path).parent
        if not folder.is_dir():
            check_writable_parent(path, "output")  # a file on the way says so
            raise PruneError(f"output {path}: folder {folder} does not exist")
        check_writable_parent(path, "output")


def save_ids(ids: list[int], path: Path) -> None:
    """Token ids as the seed saved them (a torch list, .pt) or as JSON (any other name)."""
    if path.suffix == ".pt":
        import torch

        torch.save(ids, path)
    else:
        path.write_text(json.dumps(ids))


# ---- prune_spm_and_emb.py ---------------------------------------------------------------------------------------

PRUNE_SPM_AND_EMB_USAGE = r"""Seed-compatible vocabulary pruning of an HF model folder (tokenizer + embedding / lm_head
rows).

    python prune_spm_and_emb.py --hf_dir MODEL --remain_vocab_path remain_vocab_ids.pt \
        [--save_dir MODEL2] [--remain_ids_with_spt remain_vocab_with_spt.pt]

Without --save_dir the folder is replaced in place, as the seed did on its copy (written to a temporary
sibling first, swapped in only when complete). The kept ids are completed with the special tokens, the
fallback alphabet and merge intermediates; --remain_ids_with_spt receives that final list. Same code path
as `megatron-prune vocab prune --keep-ids`.
"""


def load_ids(path: Path) -> list[int]:
    """Kept ids from a torch-saved list/tensor (.pt) or any file `vocab prune --keep-ids` reads."""
    if path.suffix == ".pt":
        import torch

        try:
            ids = torch.load(path, weights_only=True)
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError("not whole numbers")
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            raise PruneError(f"{path}: not a torch-saved list of token ids ({str(e).splitlines()[0]})") from None
        if not ids:
            raise PruneError(f"{path} holds no token ids")
        return ids
    from megatron.prune.vocab import read_keep_ids

    return read_keep_ids(path)


def prune_spm_and_emb(argv: list[str] | None = None) -> int:
    """``emb_pruner/prune_spm_and_emb.py``."""
    prog = "prune_spm_and_emb.py"
    p = OneLineParser(prog=prog, description=PRUNE_SPM_AND_EMB_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--hf_dir", required=True, type=Path, help="HF model folder")
    p.add_argument("--remain_vocab_path", type=Path, default=Path("remain_vocab_ids.pt"),
                   help="ids to keep, from get_vocab_freq.py (default %(default)s)")
    p.add_argument("--save_dir", type=Path, help="new folder (default: replace --hf_dir in place)")
    p.add_argument("--remain_ids_with_spt", type=Path, help="write the final kept ids here (.pt or .json)")
    a = p.parse_args(argv)

    from megatron.prune.vocab import prune_hf_vocab

    try:
        if not a.remain_vocab_path.is_file():
            raise PruneError(f"--remain_vocab_path {a.remain_vocab_path} does not exist (get_vocab_freq.py writes it)")
        if a.remain_ids_with_spt:
            check_output_files(a.remain_ids_with_spt)
        ids = load_ids(a.remain_vocab_path)
        in_place = a.save_dir is None
        out = a.hf_dir.parent / f".{a.hf_dir.name}.vocab-{uuid.uuid4().hex[:8]}" if in_place else a.save_dir
        plan = prune_hf_vocab(a.hf_dir, out, keep_ids=ids)
        if in_place:
            old = a.hf_dir.parent / f".{a.hf_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(a.hf_dir, old)
            os.rename(out, a.hf_dir)
            shutil.rmtree(old)
        if a.remain_ids_with_spt:
            save_ids(list(plan.vocab), a.remain_ids_with_spt)
    except (PruneError, OSError) as e:  # OSError: a full disk, a read-only filesystem
        print(f"{prog}: error: {seed_words(str(e), {'--keep-ids': '--remain_vocab_path'})}", file=sys.stderr)
        return 2
    print(f"vocabulary {plan.source.vocab_size} -> {plan.target.vocab_size} -> {a.save_dir or a.hf_dir}")
    return 0

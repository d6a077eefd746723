#!/usr/bin/env python3
r"""Seed-compatible vocabulary pruning of an HF model folder (tokenizer + embedding / lm_head rows).

    python emb_pruner/prune_spm_and_emb.py --hf_dir MODEL --remain_vocab_path remain_vocab_ids.pt \
        [--save_dir MODEL2] [--remain_ids_with_spt remain_vocab_with_spt.pt]

Without --save_dir the folder is replaced in place, as the seed did on its copy (written to a temporary
sibling first, swapped in only when complete). The kept ids are completed with the special tokens, the
fallback alphabet and merge intermediates; --remain_ids_with_spt receives that final list. Same code path
as `megatron-prune vocab prune --keep-ids`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_ids(path: Path) -> list[int]:
    """Kept ids from a torch-saved list/tensor (.pt) or any file `vocab prune --keep-ids` reads."""
    if path.suffix == ".pt":
        import torch

        ids = torch.load(path, weights_only=True)
        return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    from megatron.prune.vocab import read_keep_ids

    return read_keep_ids(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, type=Path)
    p.add_argument("--remain_vocab_path", required=True, type=Path)
    p.add_argument("--save_dir", type=Path, help="new folder (default: replace --hf_dir in place)")
    p.add_argument("--remain_ids_with_spt", type=Path, help="write the final kept ids here (.pt or .json)")
    a = p.parse_args(argv)

    from megatron.prune.shape import PruneError
    from megatron.prune.vocab import prune_hf_vocab

    try:
        if not a.remain_vocab_path.is_file():
            raise PruneError(f"--remain_vocab_path {a.remain_vocab_path} does not exist")
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
            kept = list(plan.vocab)
            if a.remain_ids_with_spt.suffix == ".pt":
                import torch

                torch.save(kept, a.remain_ids_with_spt)
            else:
                a.remain_ids_with_spt.write_text(json.dumps(kept))
    except PruneError as e:
        print(f"prune_spm_and_emb: error: {e}", file=sys.stderr)
        return 2
    print(f"vocabulary {plan.source.vocab_size} -> {plan.target.vocab_size} -> {a.save_dir or a.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed project's entry points ("Pruning LLMs to any config"), in one place: each translates the seed's flags into
the ``megatron-prune`` verb that does the work, so both give the same output. The files at the seed's paths
(``prune_llama.py``, ``prune_hf/prune_llama.py``, ``emb_pruner/*.py``) only call these."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from megatron.prune.errors import PruneError

# ---- prune_llama.py: a Megatron (or HF) checkpoint ------------------------------------------------------------

PRUNE_LLAMA_USAGE = r"""Seed-compatible entry point for pruning a Megatron (or HF) LLaMA-family checkpoint.

    python prune_llama.py --load MG_TP2 --save MG_SMALL --hidden_size_remain 3072 \
        --num_attention_heads_remain 24 --num_query_groups_remain 8 --ffn_hidden_size_remain 8192 \
        --drop_layers 10 14 18 22 --prune_type balance

No GPU is needed: it is file-to-file tensor surgery. It calls exactly what `megatron-prune prune` runs
(the input format is detected; balance keeps the input TP size and prunes each TP shard on its own).
"""

# seed flag -> `megatron-prune prune` flag
PRUNE_LLAMA_FLAGS = {
    "hidden_size_remain": "--hidden-size",
    "num_attention_heads_remain": "--num-attention-heads",
    "num_query_groups_remain": "--num-query-groups",
    "ffn_hidden_size_remain": "--ffn-hidden-size",
    "num_layers_remain": "--num-layers",
    "prune_type": "--prune-type",
    "method": "--method",
    "seed": "--seed",
    "tensor_model_parallel_size": "--tp",
    "plan": "--plan",
}


def prune_llama_argv(a: argparse.Namespace) -> list[str]:
    """The `megatron-prune prune` command line equivalent to the seed flags."""
    argv = ["prune", "--input", a.load, "--output", a.save]
    for name, flag in PRUNE_LLAMA_FLAGS.items():
        value = getattr(a, name)
        if value is not None:
            argv += [flag, str(value)]
    if a.drop_layers:
        argv += ["--drop-layers", ",".join(x for v in a.drop_layers for x in v.split(",") if x)]
    return argv + (["--overwrite"] if a.overwrite else []) + (["--no-progress"] if a.no_progress else [])


def prune_llama_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune_llama.py", description=PRUNE_LLAMA_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder to prune (Megatron torch format or HF)")
    p.add_argument("--save", required=True, help="new folder for the pruned checkpoint")
    p.add_argument("--hidden_size_remain", type=int, help="model width to keep")
    p.add_argument("--num_attention_heads_remain", type=int, help="query heads to keep")
    p.add_argument("--num_query_groups_remain", type=int, help="KV groups to keep")
    p.add_argument("--ffn_hidden_size_remain", type=int, help="MLP channels to keep")
    p.add_argument("--num_layers_remain", type=int, help="layers to keep (alternative to --drop_layers)")
    p.add_argument("--drop_layers", nargs="+", help="0-based layers to drop (space- or comma-separated)")
    p.add_argument("--prune_type", choices=["balance", "unbalance"], default="balance",
                   help="balance: prune every TP shard on its own, same TP out; unbalance: select globally")
    p.add_argument("--tensor_model_parallel_size", type=int,
                   help="unbalance: output TP size (default: the input's)")
    p.add_argument("--method", choices=["random", "magnitude"], help="selection method (default random)")
    p.add_argument("--seed", type=int, help="seed for --method random")
    p.add_argument("--plan", help="re-apply a saved prune_plan.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def prune_llama(argv: list[str] | None = None) -> int:
    """``prune_llama.py``."""
    from megatron.prune.cli import main

    return main(prune_llama_argv(prune_llama_parser().parse_args(argv)))


# ---- prune_hf/prune_llama.py: an HF checkpoint and a JSON target ------------------------------------------------

PRUNE_HF_USAGE = """Seed-compatible entry point for pruning an HF LLaMA-family checkpoint.

    python prune_hf/prune_llama.py --model_name_or_path DIR --prune_config_path target.json --output_path OUT

target.json names the target shape with HF config keys (hidden_size, num_attention_heads, num_key_value_heads,
intermediate_size, num_hidden_layers) and optionally "drop_layers": [..], "method", "seed", "tp", "prune_type".
It calls exactly what `megatron-prune prune` runs.
"""

# target.json key -> `megatron-prune prune` flag
PRUNE_HF_KEYS = {
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-query-groups",
    "num_query_groups": "--num-query-groups",
    "intermediate_size": "--ffn-hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_hidden_layers": "--num-layers",
    "num_layers": "--num-layers",
    "drop_layers": "--drop-layers",
    "method": "--method",
    "seed": "--seed",
    "tp": "--tp",
    "prune_type": "--prune-type",
}


def prune_hf_flags(config: dict) -> list[str]:
    unknown = sorted(set(config) - set(PRUNE_HF_KEYS))
    if unknown:
        raise SystemExit(f"prune_llama.py: unknown key(s) {unknown} in the prune config; valid: {sorted(PRUNE_HF_KEYS)}")
    flags: list[str] = []
    for key, value in config.items():
        flags += [PRUNE_HF_KEYS[key], ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def prune_hf(argv: list[str] | None = None) -> int:
    """``prune_hf/prune_llama.py``."""
    from megatron.prune.cli import main

    p = argparse.ArgumentParser(prog="prune_hf/prune_llama.py", description=PRUNE_HF_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="local HF checkpoint folder")
    p.add_argument("--prune_config_path", required=True, help="JSON file with the target shape")
    p.add_argument("--output_path", required=True, help="new folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args(argv)
    try:
        config = read_prune_config(a.prune_config_path)
    except PruneError as e:
        print(f"prune_llama.py: error: {e}", file=sys.stderr)
        return 2
    argv = ["prune", "--input", a.model_name_or_path, "--output", a.output_path, *prune_hf_flags(config)]
    return main(argv + (["--overwrite"] if a.overwrite else []))


def read_prune_config(path: str | Path) -> dict:
    """The JSON target of ``prune_hf/prune_llama.py``, or a PruneError saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise PruneError(f"--prune_config_path {path}: no such file")
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PruneError(f"--prune_config_path {path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PruneError(f"--prune_config_path {path}: expected a JSON object of target sizes, like "
                         '{"hidden_size": 2048, "num_hidden_layers": 20}')
    return config


def check_output_files(*paths: Path | str) -> None:
    """The seed scripts' output files can be written (their folder exists and takes files), before any work."""
    from megatron.prune.io.atomic import check_writable_parent

    for path in paths:
        folder = Path(path).parent
        if not folder.is_dir():
            check_writable_parent(path, "output")  # a file on the way says so
            raise PruneError(f"output {path}: folder {folder} does not exist")
        check_writable_parent(path, "output")


# ---- emb_pruner/get_vocab_freq.py: token frequencies and the kept ids -----------------------------------------

GET_VOCAB_FREQ_USAGE = r"""Seed-compatible token counting: frequencies over a corpus and the ids of the N most frequent tokens.

    python emb_pruner/get_vocab_freq.py --data_type txt --data_path corpus.txt --spm MODEL/tokenizer.model \
        --vocab_freq vocab_freq --remain_vocab_size 15000 --remain_vocab_ids_path remain_vocab_ids.pt

Writes ``<vocab_freq>.txt`` ("id count" lines, most frequent first), ``<vocab_freq>.json`` (the counts file
of `megatron-prune vocab count`, which remembers the tokenizer) and the kept ids. Unlike the seed, the kept
ids already include the special tokens, the byte/unk fallback and every merge intermediate a kept token
needs (exactly --remain_vocab_size of them). --spm may also be a folder with a tokenizer.json (BPE).
"""


def get_vocab_freq(argv: list[str] | None = None) -> int:
    """``emb_pruner/get_vocab_freq.py``."""
    p = argparse.ArgumentParser(prog="get_vocab_freq.py", description=GET_VOCAB_FREQ_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_type", default="txt", help="txt or jsonl (the seed's mmap is not supported)")
    p.add_argument("--data_path", nargs="+", required=True)
    p.add_argument("--spm", required=True, help="tokenizer.model / tokenizer.json, or the folder holding it")
    p.add_argument("--vocab_freq", default="vocab_freq", help="prefix of the frequency files")
    p.add_argument("--remain_vocab_size", type=int, default=20000)
    p.add_argument("--remain_vocab_ids_path", default="remain_vocab_ids.pt", help=".pt (torch list) or .json")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--model_name", default="llama", help="ignored (kept for the seed's scripts)")
    a = p.parse_args(argv)

    from megatron.prune.vocab import choose_kept, count_tokens, open_tokenizer

    try:
        if a.data_type not in ("txt", "jsonl"):
            raise PruneError(f"--data_type {a.data_type!r} is not supported; choose txt or jsonl")
        check_output_files(f"{a.vocab_freq}.json", f"{a.vocab_freq}.txt", a.remain_vocab_ids_path)
        tok_dir = Path(a.spm) if Path(a.spm).is_dir() else Path(a.spm).parent
        tf = open_tokenizer(tok_dir)
        counts = count_tokens(tok_dir, a.data_path, tf.rules, a.workers)
        kept = choose_kept(tf.rules, keep=a.remain_vocab_size, counts=counts)
        counts.save(Path(f"{a.vocab_freq}.json"))
        order = sorted(range(counts.vocab_size), key=lambda i: (-counts.counts[i], i))
        Path(f"{a.vocab_freq}.txt").write_text("".join(f"{i} {counts.counts[i]}\n" for i in order))
        save_ids(list(kept), Path(a.remain_vocab_ids_path))
    except (PruneError, OSError) as e:  # OSError: a full disk, a read-only filesystem
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


# ---- emb_pruner/prune_spm_and_emb.py: the vocabulary of an HF model ---------------------------------------------

PRUNE_SPM_AND_EMB_USAGE = r"""Seed-compatible vocabulary pruning of an HF model folder (tokenizer + embedding / lm_head rows).

    python emb_pruner/prune_spm_and_emb.py --hf_dir MODEL --remain_vocab_path remain_vocab_ids.pt \
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
    p = argparse.ArgumentParser(prog="prune_spm_and_emb.py", description=PRUNE_SPM_AND_EMB_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, type=Path)
    p.add_argument("--remain_vocab_path", required=True, type=Path)
    p.add_argument("--save_dir", type=Path, help="new folder (default: replace --hf_dir in place)")
    p.add_argument("--remain_ids_with_spt", type=Path, help="write the final kept ids here (.pt or .json)")
    a = p.parse_args(argv)

    from megatron.prune.vocab import prune_hf_vocab

    try:
        if not a.remain_vocab_path.is_file():
            raise PruneError(f"--remain_vocab_path {a.remain_vocab_path} does not exist")
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
            kept = list(plan.vocab)
            if a.remain_ids_with_spt.suffix == ".pt":
                import torch

                torch.save(kept, a.remain_ids_with_spt)
            else:
                a.remain_ids_with_spt.write_text(json.dumps(kept))
    except (PruneError, OSError) as e:  # OSError: a full disk, a read-only filesystem
        print(f"prune_spm_and_emb: error: {e}", file=sys.stderr)
        return 2
    print(f"vocabulary {plan.source.vocab_size} -> {plan.target.vocab_size} -> {a.save_dir or a.hf_dir}")
    return 0

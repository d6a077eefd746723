#!/usr/bin/env python3
r"""Seed-compatible entry point for pruning a Megatron (or HF) LLaMA-family checkpoint.

    python prune_llama.py --load MG_TP2 --save MG_SMALL --hidden_size_remain 3072 \
        --num_attention_heads_remain 24 --num_query_groups_remain 8 --ffn_hidden_size_remain 8192 \
        --drop_layers 10 14 18 22 --prune_type balance

No GPU is needed: it is file-to-file tensor surgery. It calls exactly what `megatron-prune prune` runs
(the input format is detected; balance keeps the input TP size and prunes each TP shard on its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron.prune.cli import main  # noqa: E402

# seed flag -> `megatron-prune prune` flag
FLAGS = {
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


def to_argv(a: argparse.Namespace) -> list[str]:
    """The `megatron-prune prune` command line equivalent to the seed flags."""
    argv = ["prune", "--input", a.load, "--output", a.save]
    for name, flag in FLAGS.items():
        value = getattr(a, name)
        if value is not None:
            argv += [flag, str(value)]
    if a.drop_layers:
        argv += ["--drop-layers", ",".join(x for v in a.drop_layers for x in v.split(",") if x)]
    return argv + (["--overwrite"] if a.overwrite else []) + (["--no-progress"] if a.no_progress else [])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def cli(argv: list[str] | None = None) -> int:
    return main(to_argv(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())

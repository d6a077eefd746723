#!/usr/bin/env python3
"""Seed-compatible entry point for pruning an HF LLaMA-family checkpoint.

    python prune_hf/prune_llama.py --model_name_or_path DIR --prune_config_path target.json --output_path OUT

target.json names the target shape with HF config keys (hidden_size, num_attention_heads, num_key_value_heads,
intermediate_size, num_hidden_layers) and optionally "drop_layers": [..], "method", "seed", "tp", "prune_type".
It calls exactly what `megatron-prune prune` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.prune.cli import main  # noqa: E402

# target.json key -> `megatron-prune prune` flag
KEYS = {
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


def to_flags(config: dict) -> list[str]:
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise SystemExit(f"prune_llama.py: unknown key(s) {unknown} in the prune config; valid: {sorted(KEYS)}")
    flags: list[str] = []
    for key, value in config.items():
        flags += [KEYS[key], ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def cli() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="local HF checkpoint folder")
    p.add_argument("--prune_config_path", required=True, help="JSON file with the target shape")
    p.add_argument("--output_path", required=True, help="new folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = p.parse_args()
    config = json.loads(Path(a.prune_config_path).read_text())
    argv = ["prune", "--input", a.model_name_or_path, "--output", a.output_path, *to_flags(config)]
    return main(argv + (["--overwrite"] if a.overwrite else []))


if __name__ == "__main__":
    sys.exit(cli())

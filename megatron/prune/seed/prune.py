r"""The seed's pruning entry points: ``prune_llama.py`` (a Megatron or HF checkpoint, the seed's flags) and
``prune_hf/prune_llama.py`` (an HF checkpoint and a JSON target). Both run ``megatron-prune prune``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from megatron.prune.errors import PruneError, json_type
from megatron.prune.seed.megatron_flags import (check_megatron_flags, checkpoint_values, ignored_note,
                                                parse_megatron_flags)
from megatron.prune.seed.verbs import OneLineParser, int_list, run_verb

METHODS = ("auto", "activation", "magnitude", "random")  # `megatron-prune prune --method` (tests keep them equal)
RECONSTRUCT = ("least-squares", "none")  # `megatron-prune prune --reconstruct` (tests keep them equal)
RECONSTRUCT_HELP = ("least-squares: refit the kept weights by least squares on the calibration text, so the pruned "
                    "model gives what the original gave (as `megatron-prune prune`); none: keep the sliced weights "
                    "(the seed's output). Default: least-squares where activation selection runs (--method "
                    "activation, or auto picking it), else none")

# ---- prune_llama.py ----------------------------------------------------------------------------------------------

PRUNE_LLAMA_USAGE = r"""Seed-compatible pruning of a Megatron (or HF) LLaMA-family checkpoint: the seed project's flags,
the work of `megatron-prune prune` (same output, bit for bit).

    python prune_llama.py --load MG_TP2 --save MG_SMALL --hidden_size_remain 3072 \
        --num_attention_heads_remain 24 --num_query_groups_remain 8 --ffn_hidden_size_remain 8192 \
        --drop_layers 10,14,18,22 --prune_type balance

No GPU is needed: it is file-to-file tensor surgery. The input format is detected; balance keeps the input's TP
size and prunes each TP shard on its own. Where activation selection runs (the default for a checkpoint with a
tokenizer) the kept weights are then refit by least squares on the calibration text, as by `megatron-prune prune`;
--reconstruct none keeps the sliced weights. The seed's Megatron flags (its GPT_ARGS: --tensor-model-parallel-size,
--num-layers, --hidden-size, ...) may be passed along: those describing the model are checked against the
checkpoint, the training ones are ignored with a note.
"""

# seed flag (its dest) -> `megatron-prune prune` flag
PRUNE_LLAMA_FLAGS = {
    "load": "--input",
    "save": "--output",
    "hidden_size_remain": "--hidden-size",
    "num_attention_heads_remain": "--num-attention-heads",
    "num_query_groups_remain": "--num-query-groups",
    "ffn_hidden_size_remain": "--ffn-hidden-size",
    "num_layers_remain": "--num-layers",
    "drop_layers": "--drop-layers",
    "prune_type": "--prune-type",
    "tensor_model_parallel_size": "--tp",
    "method": "--method",
    "seed": "--seed",
    "plan": "--plan",
    "gqa": "--gqa",
    "reconstruct": "--reconstruct",
}
SWITCHES = {"overwrite": "--overwrite", "no_progress": "--no-progress"}


def prune_llama_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="prune_llama.py", description=PRUNE_LLAMA_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint folder to prune (Megatron torch/torch_dist, or HF)")
    p.add_argument("--save", required=True, help="new folder for the pruned checkpoint")
    p.add_argument("--hidden_size_remain", type=int, help="model width to keep")
    p.add_argument("--num_attention_heads_remain", type=int, help="query heads to keep")
    p.add_argument("--num_query_groups_remain", type=int, help="KV groups to keep (default: all)")
    p.add_argument("--ffn_hidden_size_remain", type=int, help="MLP channels to keep")
    p.add_argument("--num_layers_remain", type=int, help="layers to keep (alternative to --drop_layers)")
    p.add_argument("--drop_layers", nargs="+", type=int_list, metavar="I",
                   help="0-based layers to drop: 7,13,18,24 (the seed's form) or 7 13 18 24")
    p.add_argument("--prune_type", choices=["balance", "unbalance"], default="balance",
                   help="balance: the same count kept in every TP shard, each pruned on its own, same TP out; "
                        "unbalance: select over whole tensors (default %(default)s)")
    p.add_argument("--tensor_model_parallel_size", type=int,
                   help="--prune_type unbalance: output TP size (default: the input's)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="how kept units are chosen: activation (importance on calibration text), magnitude "
                        "(weight norms) or random (seeded; the seed project's method). auto: activation where the "
                        "input has a tokenizer (an HF folder, or a Megatron checkpoint written by this project), "
                        "else random (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed for --method random (default 1234)")
    p.add_argument("--reconstruct", choices=RECONSTRUCT, help=RECONSTRUCT_HELP + "; with --plan, as the plan was made")
    p.add_argument("--gqa", choices=["drop-groups", "trim-heads"],
                   help="with only --num_attention_heads_remain on a GQA model: drop whole KV groups (default) or "
                        "trim heads inside every group")
    p.add_argument("--plan", help="re-apply a saved prune_plan.json instead of selecting")
    p.add_argument("--is_prune", action="store_true", help="accepted for the seed's scripts; pruning is all this does")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def prune_llama_argv(a: argparse.Namespace) -> list[str]:
    """The `megatron-prune prune` command line equivalent to the seed flags."""
    argv = ["prune"]
    for name, flag in PRUNE_LLAMA_FLAGS.items():
        value = getattr(a, name)
        if name == "drop_layers" and value:
            value = ",".join(str(i) for part in value for i in part)
        if value is not None:
            argv += [flag, str(value)]
    return argv + [flag for name, flag in SWITCHES.items() if getattr(a, name)]


def seed_names(flags: dict[str, str]) -> dict[str, str]:
    """Verb flag -> the seed flag the user typed for it (for error messages)."""
    return {new: f"--{old}" for old, new in flags.items()}


def check_checkpoint_flags(load: str, given: dict[str, Any], prog: str) -> None:
    """The Megatron flags describing the model, checked against the checkpoint at ``load``; a note for the others."""
    from megatron.prune.formats.folder import open_model

    folder = open_model(load)
    src = folder.open()
    megatron = folder.kind == "megatron"
    expected = checkpoint_values(src.shape, src.tp if megatron else None, src.pp if megatron else None)
    note = ignored_note(prog, check_megatron_flags(given, expected, load))
    if note:
        print(note, flush=True)


def prune_llama(argv: list[str] | None = None) -> int:
    """``prune_llama.py``: the seed flags (and any Megatron flags the seed's script passed) -> ``prune``."""
    prog = "prune_llama.py"
    parser = prune_llama_parser()
    a, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    megatron = parse_megatron_flags(rest, prog)
    if megatron.unknown:
        parser.error(f"unrecognized arguments: {' '.join(megatron.unknown)}")
    try:
        if megatron.given:
            check_checkpoint_flags(a.load, megatron.given, prog)
    except PruneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return run_verb(prog, prune_llama_argv(a), seed_names(PRUNE_LLAMA_FLAGS))


# ---- prune_hf/prune_llama.py -------------------------------------------------------------------------------------

PRUNE_HF_USAGE = """Seed-compatible pruning of an HF LLaMA-family checkpoint to the shape in a JSON file: the work of
`megatron-prune prune` (same output, bit for bit).

    cd prune_hf
    python prune_llama.py --model_name_or_path DIR --prune_config_path prune_config.json --output_path OUT

The JSON names the target with the seed's keys ({"hidden_size_remain": 2048, "num_attention_heads_remain": 16,
"ffn_hidden_size_remain": 6912, "drop_layers": [5, 12, 19, 26]}), with HF config keys (hidden_size,
num_attention_heads, num_key_value_heads, intermediate_size, num_hidden_layers), or it is a whole HF config.json
of the smaller model: its shape fields are the target and the rest is ignored. Optional: "method", "seed", "tp",
"prune_type". With activation selection (the default, the folder having a tokenizer) the kept weights are then refit
by least squares on the calibration text, as by `megatron-prune prune`; --reconstruct none keeps the sliced weights.
"""

# prune config key -> `megatron-prune prune` flag: the seed's keys, the HF config's shape keys, Megatron's names
PRUNE_CONFIG_KEYS = {
    "hidden_size_remain": "--hidden-size",
    "num_attention_heads_remain": "--num-attention-heads",
    "num_query_groups_remain": "--num-query-groups",
    "num_key_value_heads_remain": "--num-query-groups",
    "ffn_hidden_size_remain": "--ffn-hidden-size",
    "intermediate_size_remain": "--ffn-hidden-size",
    "num_layers_remain": "--num-layers",
    "drop_layers": "--drop-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-query-groups",
    "intermediate_size": "--ffn-hidden-size",
    "num_hidden_layers": "--num-layers",
    "num_query_groups": "--num-query-groups",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_layers": "--num-layers",
    # mixture-of-experts models (Qwen3-MoE, Mixtral)
    "num_experts_remain": "--num-experts",
    "moe_ffn_hidden_size_remain": "--moe-ffn-hidden-size",
    "num_experts_per_tok_remain": "--num-experts-per-tok",
    "num_experts": "--num-experts",
    "num_local_experts": "--num-experts",
    "moe_intermediate_size": "--moe-ffn-hidden-size",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "num_experts_per_tok": "--num-experts-per-tok",
    "method": "--method",
    "seed": "--seed",
    "tp": "--tp",
    "prune_type": "--prune-type",
}
HF_CONFIG_MARKERS = ("architectures", "model_type")  # a config.json carries these; a prune config does not
FIXED_KEYS = ("vocab_size", "head_dim")  # HF config fields pruning does not change: they must be the model's


WORD_KEYS = ("method", "prune_type")  # prune config keys whose value is a word (drop_layers: a list; the rest: numbers)


def config_value(key: str, value: Any) -> str:
    """A prune config value as its flag's text: a word for ``method``/``prune_type``, the seed's "5,12" or a list of
    whole numbers for ``drop_layers``, else a whole number; anything else (a number written as a string, a list,
    true, null, 3.5) is refused with its JSON, not read."""
    if key in WORD_KEYS or (key == "drop_layers" and isinstance(value, str)):  # drop_layers "5,12": the seed's form
        return str(value)
    if key == "drop_layers" and isinstance(value, list):
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise PruneError(f"{key}: {json.dumps(value)} holds {json.dumps(bad[0])}, not a layer number; write "
                             "whole numbers, e.g. [5, 12]")
        return ",".join(map(str, value))
    if isinstance(value, bool) or not isinstance(value, int):
        raise PruneError(f"{key}: {json.dumps(value)} is not a whole number; write e.g. 32")
    return str(value)


def prune_config_flags(config: dict[str, Any], source: dict[str, Any] | None) -> tuple[list[str], dict[str, str],
                                                                                       list[str]]:
    """(``prune`` flags, verb flag -> the key named for it, ignored keys) of a prune config; ``source`` is the model's
    own config.json, against which a whole HF config's fixed fields are checked."""
    if not isinstance(config, dict):
        raise PruneError(f"the prune config must be a JSON object, not a JSON {json_type(config)}")
    whole_hf = any(k in config for k in HF_CONFIG_MARKERS)
    unknown = sorted(set(config) - set(PRUNE_CONFIG_KEYS))
    if unknown and not whole_hf:
        raise PruneError(f"unknown key(s) {unknown} in the prune config; valid: {sorted(PRUNE_CONFIG_KEYS)} "
                         "(or give a whole HF config.json, with its 'architectures')")
    if whole_hf and source is not None:
        check_fixed_fields(config, source)
    chosen: dict[str, tuple[str, str]] = {}  # flag -> (key, value)
    keys = {**PRUNE_CONFIG_KEYS, **moe_config_keys(source)}
    for key, value in config.items():
        if keys.get(key) is None:
            continue
        flag, text = keys[key], config_value(key, value)
        if flag in chosen and chosen[flag][1] != text:
            raise PruneError(f"the prune config gives {chosen[flag][0]} {chosen[flag][1]} and {key} {text}; "
                             "give one")
        chosen[flag] = (key, text)
    flags = [x for flag, (_, text) in chosen.items() for x in (flag, text)]
    return flags, {flag: key for flag, (key, _) in chosen.items()}, unknown


def moe_config_keys(source: dict[str, Any] | None) -> dict[str, str | None]:
    """A MoE model's HF config key ``intermediate_size``: the expert width where the family says so (Mixtral), else
    the width of dense layers it does not have (Qwen3-MoE): no flag."""
    from megatron.prune.core.shape import family_of

    moe = None if source is None else family_of(source).moe
    if moe is None:
        return {}
    return {"intermediate_size": "--moe-ffn-hidden-size" if moe.expert_ffn == "intermediate_size" else None}


def check_fixed_fields(config: dict[str, Any], source: dict[str, Any]) -> None:
    """A whole HF config may not ask for a vocabulary or head size other than the model's: pruning keeps them."""
    own = {"vocab_size": source.get("vocab_size"),
           "head_dim": source.get("head_dim") or source["hidden_size"] // source["num_attention_heads"]}
    for key in FIXED_KEYS:
        if key in config and config[key] is not None and config[key] != own[key]:
            how = ("prune the vocabulary with `megatron-prune vocab prune` (or emb_pruner/)" if key == "vocab_size"
                   else "head_dim cannot change: RoPE depends on it")
            raise PruneError(f"the prune config's {key} {config[key]} is not the model's {own[key]}; {how}")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PruneError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PruneError(f"{what} {path}: not valid JSON ({e})") from None


def prune_hf(argv: list[str] | None = None) -> int:
    """``prune_hf/prune_llama.py``: an HF folder and a JSON target -> ``prune``."""
    prog = "prune_hf/prune_llama.py"
    p = OneLineParser(prog=prog, description=PRUNE_HF_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model_name_or_path", required=True, help="local HF checkpoint folder")
    p.add_argument("--prune_config_path", default="prune_config.json", type=Path,
                   help="JSON file with the target shape (default %(default)s, as in the seed)")
    p.add_argument("--output_path", required=True, help="new folder for the pruned checkpoint")
    p.add_argument("--reconstruct", choices=RECONSTRUCT, help=RECONSTRUCT_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        config = read_json(a.prune_config_path, "--prune_config_path")
        source_config = Path(a.model_name_or_path) / "config.json"
        source = read_json(source_config, "model config") if source_config.is_file() else None
        try:
            flags, keys, ignored = prune_config_flags(config, source)
        except PruneError as e:
            raise PruneError(f"--prune_config_path {a.prune_config_path}: {e}") from None
    except PruneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if ignored:
        print(f"{prog}: note: {a.prune_config_path} is a whole HF config: its shape fields "
              f"({', '.join(keys.values())}) are the target; {len(ignored)} other keys are ignored", flush=True)
    argv = ["prune", "--input", a.model_name_or_path, "--output", a.output_path, *flags,
            *(["--reconstruct", a.reconstruct] if a.reconstruct else []),
            *(["--overwrite"] if a.overwrite else []), *(["--no-progress"] if a.no_progress else [])]
    names = {"--input": "--model_name_or_path", "--output": "--output_path", **keys}
    return run_verb(prog, argv, names)

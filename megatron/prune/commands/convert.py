"""Convert between HF safetensors and Megatron-LM (megatron-core GPTModel, torch format) checkpoints.

hf-to-megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP and writes the
`args` that `--use-checkpoint-args` reads; megatron-to-hf gathers TP/PP shards and removes the padding.
The HF config and tokenizer travel in the Megatron checkpoint's hf_meta/ folder.

Examples:
  megatron-prune convert hf-to-megatron --input llama-hf --output llama-mg --tp 2 --pp 1
  megatron-prune convert megatron-to-hf --input llama-mg --output llama-hf2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron.prune.commands import add_ckpt_format_argument
from megatron.prune.errors import PruneError, check_at_least
from megatron.prune.formats.mcore.schema import MOE_SPEC, SPEC_CHOICES, resolve_spec

HELP = "convert HF <-> Megatron checkpoints (hf-to-megatron with --tp/--pp, megatron-to-hf)"
DIRECTIONS = ("hf-to-megatron", "megatron-to-hf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("direction", choices=DIRECTIONS, help="which way to convert")
    add_io_arguments(p)
    add_hf_to_megatron_arguments(p)
    add_megatron_to_hf_arguments(p)


def add_io_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of both directions (also those of tools/checkpoint_conversion/*.py)."""
    p.add_argument("--input", required=True, type=Path, help="source checkpoint folder")
    p.add_argument("--output", required=True, type=Path, help="new folder for the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_hf_to_megatron_arguments(p: argparse.ArgumentParser) -> None:
    """hf-to-megatron's flags: no defaults here, so that megatron-to-hf can refuse them (:func:`check_arguments`
    fills in :data:`TO_MEGATRON_DEFAULTS`)."""
    p.add_argument("--tp", type=int, help="hf-to-megatron: tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, help="hf-to-megatron: pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, help="hf-to-megatron: expert-parallel size of a mixture-of-experts model "
                                          "(Megatron-LM's --expert-model-parallel-size; default 1)")
    p.add_argument("--transformer-impl", choices=SPEC_CHOICES,
                   help="hf-to-megatron: layer spec whose parameter names to write; auto (the default): the spec "
                        "pretrain_llama.py builds on this machine, transformer_engine where Transformer Engine and a "
                        "GPU are present, else local")
    p.add_argument("--moe-grouped-gemm", action="store_true", default=None,
                   help="hf-to-megatron: write a mixture-of-experts model's experts as megatron-core's TEGroupedMLP "
                        "(mlp.experts.linear_fc1.weightE; transformer_engine spec, recorded as moe_grouped_gemm=True) "
                        "instead of SequentialMLP (mlp.experts.local_experts.E.*; local spec)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, metavar="N",
                   help="hf-to-megatron: vocab padding unit before the TP factor (default 128)")
    add_ckpt_format_argument(p, "hf-to-megatron: ")


def add_megatron_to_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iteration", type=int, metavar="N",
                   help="megatron-to-hf: export saved iteration N (default: the latest, named by "
                        "latest_checkpointed_iteration.txt)")


# hf-to-megatron's flags and their defaults; megatron-to-hf takes none of them (its input's layout is read).
TO_MEGATRON_DEFAULTS = {"tp": 1, "pp": 1, "ep": 1, "transformer_impl": "auto", "make_vocab_size_divisible_by": 128,
                        "ckpt_format": "torch", "moe_grouped_gemm": False}


def flag(dest: str) -> str:
    """The command-line flag of an argparse destination."""
    return "--" + dest.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags of the other direction and numbers that cannot apply (none takes 0 to mean its default); fill in
    hf-to-megatron's defaults. A seed tool's parser has one direction's flags only: the others are absent."""
    iteration = getattr(args, "iteration", None)
    if args.direction == "hf-to-megatron":
        if iteration is not None:
            raise PruneError(f"--iteration {iteration}: only for megatron-to-hf (an HF folder has one set of weights)")
        for name, default in TO_MEGATRON_DEFAULTS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, default)
        for name in ("tp", "pp", "ep", "make_vocab_size_divisible_by"):
            check_at_least(flag(name), getattr(args, name), 1)
        return
    given = [f"{flag(n)} {getattr(args, n)}" for n in TO_MEGATRON_DEFAULTS if getattr(args, n, None) is not None]
    if given:
        raise PruneError(f"{', '.join(given)}: only for hf-to-megatron; megatron-to-hf gathers every shard into one "
                         "HF checkpoint (to change a Megatron checkpoint's layout, use `megatron-prune reshard`)")
    check_at_least("--iteration", iteration, 0)


def output_spec(transformer_impl: str, grouped: bool) -> str:
    """The layer spec to write: grouped-GEMM experts exist in megatron-core's transformer_engine spec only, so
    ``auto`` means that spec with --moe-grouped-gemm (an explicit other spec is refused when the model is read)."""
    return MOE_SPEC[True] if grouped and transformer_impl == "auto" else resolve_spec(transformer_impl)


def run(args: argparse.Namespace) -> int:
    from megatron.prune.formats.mcore.ops import hf_to_megatron, megatron_to_hf
    from megatron.prune.formats.mcore.schema import META_DIR

    check_arguments(args)
    if args.direction == "hf-to-megatron":
        spec = output_spec(args.transformer_impl, args.moe_grouped_gemm)
        hf_to_megatron(args.input, args.output, args.tp, args.pp, spec,
                       args.make_vocab_size_divisible_by, args.overwrite, not args.no_progress, args.ckpt_format,
                       ep=args.ep, grouped=args.moe_grouped_gemm)
        ep = f", EP={args.ep}" if args.ep > 1 else ""
        grouped = ", grouped-GEMM experts" if args.moe_grouped_gemm else ""
        print(f"wrote Megatron checkpoint {args.output} (TP={args.tp}, PP={args.pp}{ep}, {spec} spec{grouped}, "
              f"{args.ckpt_format} format)")
    else:
        megatron_to_hf(args.input, args.output, args.overwrite, not args.no_progress,
                       iteration=getattr(args, "iteration", None))
        print(f"wrote HF checkpoint {args.output}")
        if not (args.input / META_DIR).is_dir():
            print(f"note: {args.input} has no {META_DIR}/ (it was not converted by megatron-prune), so config.json was "
                  "built from its args and the output has no tokenizer and no bos/eos token ids: copy the tokenizer "
                  "files of the model it came from beside it and set bos_token_id/eos_token_id in config.json")
    return 0

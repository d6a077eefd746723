"""Change the tensor/pipeline/expert-parallel split (or the layer spec) of a Megatron checkpoint; weights unchanged.

Only the model is carried over: the optimizer and RNG state are dropped and the iteration is reset to 0, so a
resharded checkpoint starts training afresh (load it with --finetune; scripts/check_model.sh does when LOAD != SAVE).

Examples:
  megatron-prune reshard --input llama-mg-tp2 --output llama-mg-tp4 --tp 4
  megatron-prune reshard --input llama-mg --output llama-mg-te --transformer-impl transformer_engine
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron.prune.commands import add_ckpt_format_argument
from megatron.prune.errors import check_at_least
from megatron.prune.formats.mcore.schema import SPEC_CHOICES, resolve_spec

HELP = "change a Megatron checkpoint's TP/PP/EP size (or layer spec); optimizer state dropped, iteration reset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, type=Path, help="Megatron checkpoint folder")
    p.add_argument("--output", required=True, type=Path, help="new folder for the resharded checkpoint")
    p.add_argument("--tp", type=int, help="new tensor-parallel size (default: keep)")
    p.add_argument("--pp", type=int, help="new pipeline-parallel size (default: keep)")
    p.add_argument("--ep", type=int, help="new expert-parallel size of a mixture-of-experts model (default: keep)")
    p.add_argument("--transformer-impl", choices=SPEC_CHOICES,
                   help="layer spec whose parameter names to write (default: keep; auto: the spec pretrain_llama.py "
                        "builds on this machine); a mixture-of-experts model's experts follow it: SequentialMLP in "
                        "local, grouped GEMM (TEGroupedMLP) in transformer_engine")
    add_ckpt_format_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from megatron.prune.formats.folder import open_megatron
    from megatron.prune.formats.mcore.ops import NOT_CARRIED, reshard

    check_at_least("--tp", args.tp, 1, " (leave it out to keep the checkpoint's)")
    check_at_least("--pp", args.pp, 1, " (leave it out to keep the checkpoint's)")
    check_at_least("--ep", args.ep, 1, " (leave it out to keep the checkpoint's)")
    ckpt_format = args.ckpt_format or "torch"
    spec = resolve_spec(args.transformer_impl) if args.transformer_impl else None
    reshard(args.input, args.output, args.tp, args.pp, spec, overwrite=args.overwrite,
            progress=not args.no_progress, ckpt_format=ckpt_format, ep=args.ep)
    out = open_megatron(args.output)
    ep = f", EP={out.ep}" if out.ep > 1 else ""
    print(f"wrote {args.output} (TP={out.tp}, PP={out.pp}{ep}, {out.spec} spec, {ckpt_format} format)")
    print(f"note: {NOT_CARRIED}")
    return 0

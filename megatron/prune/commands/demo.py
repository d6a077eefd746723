"""Prune the embedded SmolLM2-135M-Instruct to a smaller shape with each selection method, side by side.

Activation selection is shown twice: with the least-squares refit of the kept weights (the default) and, the same
plan, without it. Prints parameters, perplexity on held-out text (Python's own docs, never used for calibration),
time taken, and a short greedy generation from each model. This is what `make demo` runs; it needs no network, and
uses a GPU where there is one (--device).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from megatron.prune.errors import check_at_least
from megatron.prune.io.atomic import check_output_path
from megatron.prune.models import cache_root, embedded_model_dir
from megatron.prune.perplexity import greedy, perplexity
from megatron.prune.runtime import DEVICE_CHOICES, load_hf, model_seq_len, resolve_device, tokenize
from megatron.prune.scoring.methods import SCORERS
from megatron.prune.scoring.stats import DEFAULT_SAMPLES
from megatron.prune.text import builtin_text

HELP = "prune the embedded model with each method and compare perplexity and generations"
# The documented demo shape: every width axis and depth shrink (134.5M -> ~72M parameters).
DEMO_SHAPE = {"num-layers": 24, "hidden-size": 480, "num-attention-heads": 6, "ffn-hidden-size": 1024}
PROMPT = "The built-in function len() returns"
METHOD_ORDER = ("activation", "magnitude", "random")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, default=None,
                   help="where the pruned models go (default: <cache>/demo, cache = $MEGATRON_PRUNE_CACHE or "
                        "~/.cache/megatron-prune)")
    p.add_argument("--methods", nargs="+", choices=sorted(SCORERS),
                   default=[m for m in METHOD_ORDER if m in SCORERS],
                   help="selection methods to compare (default: all available)")
    p.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens for perplexity (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window (default %(default)s)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_SAMPLES,
                   help="calibration windows of 256 tokens for --method activation (default %(default)s, as prune's "
                        "--samples; fewer is quicker and worse: 32 gave perplexity 66 against 54)")
    p.add_argument("--device", default="auto",
                   help=f"where pruning and evaluation run: {DEVICE_CHOICES} (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from megatron.prune.cli import build_parser

    check_at_least("--max-tokens", args.max_tokens, 1)
    check_at_least("--seq-len", args.seq_len, 2)
    check_at_least("--calib-samples", args.calib_samples, 1)
    device = resolve_device(args.device)
    out_root = args.output or cache_root() / "demo"
    check_output_path([], out_root, overwrite=True)  # before a minute of measuring, not after
    src = embedded_model_dir()
    model_seq_len(src, args.seq_len, args.seq_len)  # a window past the model's positions: refused, not run
    rows = []

    def measure(name: str, folder: Path, seconds: float) -> None:
        model, tok = load_hf(folder, device=device)
        ids = tokenize(tok, builtin_text("eval"), args.max_tokens)
        ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, ppl, seconds, greedy(model, tok, PROMPT)))
        print(f"  {name}: {params / 1e6:.1f}M parameters, perplexity {ppl:.2f}")

    print(f"embedded model: {src} (on {device})")
    measure("original", src, 0.0)
    parser = build_parser(["prune"])
    shape_flags = [x for k, v in DEMO_SHAPE.items() for x in (f"--{k}", str(v))]
    def prune(name: str, out: Path, *flags: str) -> None:
        t0 = time.time()
        prune_args = parser.parse_args(["prune", "--input", str(src), "--output", str(out), "--overwrite",
                                        "--no-progress", "--device", device, *flags])
        prune_args._run(prune_args)
        measure(name, out, time.time() - t0)

    for method in args.methods:
        out = out_root / f"smollm2-{method}"
        if method != "activation":
            prune(f"pruned ({method})", out, "--method", method, *shape_flags)
            continue
        # activation selection refits the kept weights by default; the same plan without the refit beside it
        prune("pruned (activation+refit)", out, "--method", method, *shape_flags, "--samples",
              str(args.calib_samples))
        prune("pruned (activation)", out_root / "smollm2-activation-no-refit", "--plan",
              str(out / "prune_plan.json"), "--reconstruct", "none")

    print()
    print(f"prompt: {PROMPT!r}")
    print(f"{'model':<26} {'params':>9} {'perplexity':>12} {'prune time':>11}  greedy continuation")
    for name, params, ppl, secs, text in rows:
        cont = " ".join(text.split())[:60]
        print(f"{name:<26} {params / 1e6:>8.1f}M {ppl:>12.2f} {secs:>10.1f}s  {cont}")
    print(f"\npruned models are in {out_root}; shape: " + ", ".join(f"--{k} {v}" for k, v in DEMO_SHAPE.items()))
    return 0

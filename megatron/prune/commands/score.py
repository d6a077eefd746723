"""Score every prunable unit of a model by its activations on calibration text (one forward pass).

The model is an HF checkpoint, or a Megatron checkpoint (any TP/PP, torch or torch_dist) run as the HF model it
converts to, built in memory with the tokenizer of its hf_meta/.

Collects, per layer: hidden-channel importance (|x| of the RMSNorm outputs feeding attention and MLP),
query-head and KV-group importance (L2 norm of each head's attention output before o_proj), FFN-channel
importance (|x| of the input of down_proj) and block influence (1 - cos(layer input, layer output)).
Tokens and samples are aggregated by --aggregation: rms (L2 over all tokens; the default, measured better
in bench/quality.py), mean, or mean-l2 (Minitron: mean over the sequence, L2 over samples). The scores file
feeds `prune --method activation --scores FILE`, for the HF checkpoint and for the Megatron checkpoint of the same
model alike.

Examples:
  megatron-prune score --model smollm2 --output scores.pt                 # built-in calibration text
  megatron-prune score --model smollm2 --calib a.txt b.jsonl --samples 128 --seq-len 512 --output scores.pt
  megatron-prune prune --input smollm2 --output small --method activation --scores scores.pt --num-layers 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron.prune.data import check_input_file
from megatron.prune.errors import PruneError, check_at_least
from megatron.prune.io.atomic import check_writable_parent
from megatron.prune.runtime import DTYPES, model_seq_len, resolve_device
from megatron.prune.scoring import methods
from megatron.prune.scoring.layerwise import MODES
from megatron.prune.scoring.stats import AGGREGATIONS, DEFAULT_AGGREGATION

HELP = "score channels, heads, KV groups, FFN channels and layers by their activations (for --method activation)"


def add_calibration_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags that choose calibration data and how it is run; shared with ``prune --method activation``."""
    p.add_argument("--calib", type=Path, nargs="+", metavar="FILE",
                   help=".txt or .jsonl ('text' field) calibration files; default: the built-in calibration text "
                        "(Python's documentation, disjoint from the held-out evaluation text)")
    p.add_argument("--samples", type=int, default=methods.DEFAULT_SAMPLES,
                   help="calibration windows, spread evenly over the text (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=methods.DEFAULT_SEQ_LEN,
                   help="tokens per calibration window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=methods.DEFAULT_BATCH_SIZE,
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda where a GPU is available, else cpu), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype of the scoring pass; statistics accumulate in float32 (default %(default)s)")
    p.add_argument("--layer-by-layer", choices=MODES, default="auto",
                   help="hold one decoder layer at a time on --device (read from the checkpoint as it goes), for "
                        "models that do not fit: peak memory is one layer plus the calibration activations, the "
                        "scores are the same; auto does so when the whole model would take more than half of the "
                        "free memory (default %(default)s)")
    p.add_argument("--aggregation", choices=list(AGGREGATIONS), default=DEFAULT_AGGREGATION,
                   help="how per-token statistics become one score: mean-l2 = mean over the sequence then L2 over "
                        "samples (Minitron); mean = over all tokens; rms = L2 over all tokens (default %(default)s)")


def check_calibration_arguments(args: argparse.Namespace, model: Path | None = None) -> None:
    """Refuse calibration flags that cannot run (none takes 0 to mean its default), before any work; with the
    ``model`` folder, a --seq-len other than the default that is longer than its positions (the default is left to
    models shorter than it: RoPE runs past them)."""
    check_at_least("--samples", args.samples, 1)
    check_at_least("--seq-len", args.seq_len, 2)
    check_at_least("--batch-size", args.batch_size, 1)
    resolve_device(args.device)
    for path in args.calib or ():
        check_input_file(path, "--calib", several=True)
    if model is not None and int(args.seq_len) != methods.DEFAULT_SEQ_LEN:
        model_seq_len(model, int(args.seq_len), methods.DEFAULT_SEQ_LEN)


def scoring_options(args: argparse.Namespace, seed: int = 0, scores: Path | None = None) -> methods.ScoringOptions:
    """The calibration flags (:func:`add_calibration_arguments`) as the scoring methods take them; ``prune`` adds
    its random seed and scores file."""
    return methods.ScoringOptions(seed=seed, progress=not args.no_progress, scores=scores,
                                  calib=tuple(args.calib) if args.calib else None, samples=args.samples,
                                  seq_len=args.seq_len, batch_size=args.batch_size, device=resolve_device(args.device),
                                  dtype=args.dtype, aggregation=args.aggregation, layer_by_layer=args.layer_by_layer)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="HF checkpoint folder (with its tokenizer), or Megatron checkpoint with a tokenizer in "
                        "hf_meta/")
    p.add_argument("--output", required=True, type=Path, help="scores file to write (torch .pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing scores file")
    add_calibration_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse a scores file that is a folder, lies in no folder, exists without ``overwrite``, or cannot be written."""
    if path.is_dir():
        raise PruneError(f"--output {path} is a folder; give a file name such as {path / 'scores.pt'}")
    if not path.parent.is_dir():
        check_writable_parent(path, "--output")  # a file on the way says so
        raise PruneError(f"--output {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise PruneError(f"--output {path} exists; pass --overwrite to replace it")
    check_writable_parent(path, "--output")


def run(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite)
    check_calibration_arguments(args, args.model)
    result = methods.score_model(args.model, scoring_options(args))
    methods.save_scores(result, args.output)
    m = result.meta
    print(f"scored {m['tokens']} tokens ({m['samples']} x {m['seq_len']}, {m['calib']}) in {m['seconds']:.1f}s, "
          f"aggregation {m['aggregation']}{', layer by layer' if m['layer_by_layer'] else ''}")
    for line in methods.summary(result.scores):
        print("  " + line)
    print(f"wrote {args.output}")
    return 0

"""Measure perplexity of a model on non-overlapping windows of text.

The model is an HF checkpoint, or a Megatron checkpoint (any TP/PP, torch or torch_dist) run as the HF model it
converts to, built in memory with the tokenizer of its hf_meta/ (the same logits as the exported model).

Without --text the built-in held-out text is used (Python's own documentation, `pydoc_data.topics`, the part
never used for calibration). The last line printed is `perplexity: X`. A model that would take more than half of
the free memory of --device runs one decoder layer at a time (--layer-by-layer), with the same result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron.prune.data import check_input_file
from megatron.prune.errors import PruneError, check_at_least
from megatron.prune.perplexity import Perplexity, perplexity
from megatron.prune.runtime import (DTYPES, check_model_folder, load_hf, load_tokenizer, model_seq_len, resolve_device,
                                    tokenize)
from megatron.prune.scoring.layerwise import MODES, perplexity_layerwise, source_shape, use_layerwise
from megatron.prune.text import builtin_text, read_texts

DEFAULT_SEQ_LEN = 512
HELP = "perplexity (or lm-eval tasks) of an HF or Megatron checkpoint on held-out text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="HF checkpoint folder, or Megatron checkpoint with a tokenizer in hf_meta/")
    p.add_argument("--text", type=Path, nargs="+",
                   help=".txt or .jsonl ('text' field) files; default: built-in held-out text")
    p.add_argument("--seq-len", type=int, help=f"window length in tokens (default {DEFAULT_SEQ_LEN}, or the model's "
                                               "max_position_embeddings where that is shorter; at most that)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="use at most this many tokens (default %(default)s; 0 = all)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda where a GPU is available, else cpu), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default %(default)s)")
    p.add_argument("--layer-by-layer", choices=MODES, default="auto",
                   help="perplexity with one decoder layer at a time on --device (read from the checkpoint as it "
                        "goes), for models that do not fit; same result; auto does so when the whole model would "
                        "take more than half of the free memory (default %(default)s; not with --tasks)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line before the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = p.add_argument_group("lm-evaluation-harness (pip install 'megatron-prune[eval]'; tasks download their data)")
    t.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval tasks (e.g. hellaswag arc_easy) instead of "
                   "perplexity; prints one line per task")
    t.add_argument("--include-path", type=Path, nargs="+", metavar="DIR", help="folders of extra (local) task YAMLs")
    t.add_argument("--limit", type=int, help="at most this many examples per task")
    t.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse numbers that cannot run (none takes 0 or -1 to mean its default) and unknown devices, before any work."""
    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--seq-len", args.seq_len, 2)
    check_at_least("--max-tokens", args.max_tokens, 0, " (0 = all)")
    check_at_least("--limit", args.limit, 1)
    check_at_least("--num-fewshot", args.num_fewshot, 0)
    args.device = resolve_device(args.device)
    for path in args.text or ():
        check_input_file(path, "--text", several=True)
    check_model_folder(args.model)
    args.seq_len = model_seq_len(args.model, args.seq_len, DEFAULT_SEQ_LEN)
    if not args.tasks and args.max_tokens and args.max_tokens < args.seq_len:
        raise PruneError(f"--max-tokens {args.max_tokens}: fewer than one window of --seq-len {args.seq_len}; use "
                         f"--max-tokens {args.seq_len} or more (0 = all), or a shorter --seq-len")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    check_arguments(args)
    if args.tasks and args.layer_by_layer == "always":
        raise PruneError("--layer-by-layer always: lm-eval tasks need the whole model in memory; drop one of "
                         "--tasks and --layer-by-layer")
    if not args.tasks and layer_by_layer(args):
        text = read_texts(args.text, "--text") if args.text else builtin_text("eval")
        ids = tokenize(load_tokenizer(args.model), text, args.max_tokens or None, source_shape(args.model).vocab_size)
        return report(args, perplexity_layerwise(args.model, ids, args.seq_len, args.batch_size, DTYPES[args.dtype],
                                                 args.device, progress=not args.no_progress), t0)
    model, tok = load_hf(args.model, DTYPES[args.dtype], args.device)
    if args.tasks:
        from megatron.prune.harness import format_results, run_tasks

        results = run_tasks(model, tok, args.tasks, args.include_path, args.batch_size, args.limit, args.num_fewshot)
        if args.json:
            print(json.dumps({"model": str(args.model), "tasks": results}, default=str))
        print("\n".join(format_results(results)))
        return 0
    text = read_texts(args.text, "--text") if args.text else builtin_text("eval")
    ids = tokenize(tok, text, args.max_tokens or None, model.get_input_embeddings().num_embeddings)
    return report(args, perplexity(model, ids, args.seq_len, args.batch_size, progress=not args.no_progress), t0)


def layer_by_layer(args: argparse.Namespace) -> bool:
    """--layer-by-layer for the perplexity pass (auto: when the whole model would not fit comfortably)."""
    if args.layer_by_layer == "never":
        return False
    check_model_folder(args.model)
    shape = source_shape(args.model)
    chosen, why = use_layerwise(args.layer_by_layer, shape, DTYPES[args.dtype], args.device, "perplexity")
    if why:
        print(why, flush=True)
    return chosen


def report(args: argparse.Namespace, result: Perplexity, t0: float) -> int:
    """Print the perplexity (the last line), as JSON too with --json."""
    if args.json:
        print(json.dumps({"model": str(args.model), "perplexity": result.perplexity, "nll": result.nll,
                          "tokens": result.tokens, "windows": result.windows, "seconds": round(time.time() - t0, 2)}))
    else:
        print(f"{result.tokens} tokens in {result.windows} windows of {args.seq_len}, nll {result.nll:.4f}")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0

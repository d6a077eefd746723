r"""Prune a checkpoint (HF safetensors or Megatron) to a smaller shape.

Axes you do not name are kept. The chosen indices are written beside the weights as prune_plan.json;
`--plan` re-applies such a plan bit-identically. With no target at all every tensor equals the input's.

With activation selection (the default where the input has a tokenizer) the kept weights are then refit by least
squares (--reconstruct least-squares): every linear that reads a pruned axis is refit, layer by layer on the pruned
model's own inputs, to give what the original gave on the calibration text; one decoder layer is held at a time, on
HF and Megatron (any TP/PP) inputs alike. --reconstruct none keeps the sliced weights. When only per-layer axes
shrink (heads, query groups, FFN; hidden size and layers kept) each layer's units are chosen inside that same pass,
from the activations of its original layer: no separate scoring pass, and the plan is the one `score` then
`prune --scores` gives.

Examples:
  megatron-prune prune --input smollm2 --output small --hidden-size 480 --num-attention-heads 6 \
      --ffn-hidden-size 1024 --num-layers 24
  megatron-prune prune --input llama-7b --output llama-3b --method magnitude --tp 2 --prune-type balance ...
  megatron-prune prune --input other-copy --output again --plan small/prune_plan.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

from megatron.prune.commands import add_ckpt_format_argument
from megatron.prune.commands.score import add_calibration_arguments, check_calibration_arguments, scoring_options
from megatron.prune.core.plan import NORM_RESCALES, PrunePlan, norm_rescale, shape_differences
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.core.target import (GQA_MODES, MOE_FLAGS, TargetRequest, check_tp_balance, gqa_query_groups,
                                        resolve_target, top_k_note)
from megatron.prune.errors import PruneError, check_at_least
from megatron.prune.formats import ADAPTERS
from megatron.prune.formats.folder import open_model
from megatron.prune.formats.source import FormatAdapter, TensorSource, WriteOptions
from megatron.prune.io.atomic import check_output_path, scratch_folder
from megatron.prune.refit.run import RECONSTRUCT, check_reconstruct, default_reconstruct, reconstruct
from megatron.prune.refit.run import describe as describe_refit
from megatron.prune.refit.sequential import FusedSelection, RefitOptions, fusable
from megatron.prune.refit.solve import DEFAULT_DAMPING
from megatron.prune.scoring.methods import SCORERS, auto_method, method_settings

HELP = "prune a checkpoint to a smaller shape (layers, hidden, heads, KV groups, FFN)"


def parse_layer_list(text: str) -> tuple[int, ...] | str:
    if text.strip() == "auto":
        return "auto"  # with --num-layers: keep the layers of most block influence (--method activation)
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 3,7,11, got {text!r}")


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 500MB, got {text!r}")


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target shape (omit an axis to keep it)")
    g.add_argument("--hidden-size", type=int, help="model width; for HF output a multiple of the head count")
    g.add_argument("--num-attention-heads", type=int, help="query heads; a multiple of the kept KV groups")
    g.add_argument("--num-query-groups", type=int,
                   help="KV heads (GQA groups); default: keep all (MHA models follow --num-attention-heads)")
    g.add_argument("--ffn-hidden-size", type=int, help="MLP intermediate size (dense models)")
    g.add_argument("--num-experts", type=int, help="mixture-of-experts models: experts kept in every layer")
    g.add_argument("--moe-ffn-hidden-size", type=int,
                   help="mixture-of-experts models: FFN channels kept in each kept expert")
    g.add_argument("--num-experts-per-tok", type=int,
                   help="mixture-of-experts models: the router's top-k (default: the source's, clamped to the kept "
                        "experts)")
    layers = g  # --num-layers and --drop-layers together must agree (resolve_target checks); "auto" needs both
    layers.add_argument("--num-layers", type=int,
                        help="keep this many layers; which ones depends on --method (random/magnitude: the seed "
                             "project's rule, dropped layers spread through the middle, never first or last)")
    layers.add_argument("--drop-layers", type=parse_layer_list, metavar="I,J,...",
                        help="drop exactly these layers (0-based); 'auto' with --num-layers N keeps the N layers "
                             "of most block influence (1 - cos(layer input, output); --method activation)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, type=Path, help="checkpoint folder (HF or Megatron; detected)")
    p.add_argument("--output", required=True, type=Path, help="new folder for the pruned checkpoint")
    add_target_arguments(p)
    s = p.add_argument_group("selection")
    s.add_argument("--method", choices=["auto", *sorted(SCORERS)], default="auto",
                   help="how kept units are chosen: activation (importance on calibration text + block influence "
                        "for layers; see `megatron-prune score`), random (seeded, the seed project's method) or "
                        "magnitude (L2 norm of each unit's weights). auto: activation where the input can be scored "
                        "(a tokenizer beside the HF config or in a Megatron checkpoint's hf_meta/, or --scores), "
                        "else random. Default: %(default)s")
    s.add_argument("--seed", type=int, default=1234, help="seed for --method random (default %(default)s)")
    s.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size the selection must respect (default: the Megatron input's TP, else 1); "
                        "with --prune-type unbalance and Megatron input, the output TP")
    s.add_argument("--prune-type", choices=["balance", "unbalance"], default="balance",
                   help="balance: keep the same number of heads/groups/FFN channels inside each of the --tp "
                        "slices, so each TP shard can be pruned on its own; unbalance: select globally")
    s.add_argument("--plan", type=Path,
                   help="re-apply a saved prune_plan.json instead of selecting; a plan that was refit is refit again "
                        "with the calibration and refit settings it records (--calib, --samples, --seq-len, "
                        "--batch-size, --dtype, --damping), except those typed here")
    s.add_argument("--gqa", choices=GQA_MODES, default="drop-groups",
                   help="when only --num-attention-heads is given on a GQA model: trim-heads keeps every KV group "
                        "and fewer heads per group; drop-groups drops whole KV groups (default %(default)s, "
                        "the better by bench/quality.py)")
    s.add_argument("--norm-rescale", choices=NORM_RESCALES, default="sqrt",
                   help="when the hidden size shrinks, multiply RMSNorm weights by sqrt(h/h') (sqrt) or leave them "
                        "(none); recorded in the plan (default %(default)s, measured in bench/quality.py)")
    a = p.add_argument_group("activation scoring (--method activation)")
    a.add_argument("--scores", type=Path, help="scores from `megatron-prune score`; without it "
                                               "the input is scored on --calib or the built-in text")
    add_calibration_arguments(a)
    r = p.add_argument_group("reconstruction (refit the kept weights on calibration text)")
    r.add_argument("--reconstruct", choices=RECONSTRUCT, default=None,
                   help="least-squares: refit every linear that reads a pruned axis (q/k/v, o_proj, gate/up, "
                        "down_proj; in a mixture of experts the router and each kept expert's gate/up and down_proj; "
                        "an untied lm_head) so the pruned model reproduces the original's outputs on "
                        "calibration text, layer by layer on the pruned model's own inputs; none: keep the sliced "
                        "weights. Default: least-squares where the selection runs calibration text (activation, "
                        "also --method auto when it picks activation), else none; with --method random|magnitude "
                        "it needs --calib")
    r.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                   help="ridge of the refit, as a multiple of the mean diagonal of the input moments, pulling "
                        "toward the sliced weights (default %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="split HF safetensors output above this size (default 5GB)")
    add_ckpt_format_argument(o, "Megatron input only: ")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    for action in p._actions:  # defaults that say so: --plan fills the flags not typed from the plan's record
        if action.dest in REPLAYED and action.default is not None:
            action.default = type("Default", (type(action.default),), {})(action.default)


# the refit settings a plan records and --plan replays where the flag is not typed (a saved refit gives the same
# weights again): flag dest -> key in the plan's info["reconstruct"]
REPLAYED = {"calib": "calib", "samples": "samples", "seq_len": "seq_len", "batch_size": "batch_size",
            "dtype": "dtype", "damping": "damping"}


def typed_flags(args: argparse.Namespace) -> set[str]:
    """The :data:`REPLAYED` flags given on the command line; their values become plain numbers and strings."""
    typed = set()
    for dest in REPLAYED:
        value = getattr(args, dest, None)
        if type(value).__name__ == "Default":
            setattr(args, dest, type(value).__mro__[1](value))
        elif value is not None:
            typed.add(dest)
    return typed


def replay_refit_settings(args: argparse.Namespace, plan: PrunePlan, path: Path) -> None:
    """Take the calibration and refit settings an untyped flag leaves open from the refit ``plan`` records, so that
    ``--plan`` gives the weights that run wrote; says which."""
    record, taken = plan.info.get("reconstruct") or {}, []
    for dest, key in REPLAYED.items():
        if dest in args._typed or key not in record:
            continue
        value = record[key]
        if dest == "calib":
            if value == "builtin:calib":
                continue
            value = [Path(f) for f in value]
            missing = [str(f) for f in value if not f.is_file()]
            if missing:
                raise PruneError(f"--plan {path} was refit on --calib {' '.join(map(str, value))}, and "
                                 f"{', '.join(missing)} is not here: pass --calib (the same text gives the same "
                                 "weights), or --reconstruct none")
        setattr(args, dest, value)
        taken.append(f"--{dest.replace('_', '-')} {' '.join(map(str, value)) if dest == 'calib' else value}")
    if taken:
        print(f"--plan: refit as the plan records it: {', '.join(taken)}")


def write_options(args: argparse.Namespace) -> WriteOptions:
    """The output flags as the adapters take them."""
    return WriteOptions(overwrite=args.overwrite, progress=not args.no_progress, max_shard_bytes=args.max_shard_size,
                        prune_type=args.prune_type, tp=args.tp, ckpt_format=args.ckpt_format or "torch")


def refit_options(args: argparse.Namespace) -> RefitOptions:
    """The reconstruction flags as the refit takes them."""
    return RefitOptions(damping=args.damping)


def build_plan(args: argparse.Namespace, src: TensorSource,
               adapter: FormatAdapter) -> tuple[PrunePlan, str, FusedSelection | None]:
    """A plan from ``--plan``, or from the target flags and the selection method, checked for the format; the
    ``--reconstruct`` method, checked too (all before the scoring pass); and, when activation selection can be made
    inside the refit's own pass (only per-layer axes pruned), the plan holds the counts only and the selection says
    how the refit chooses the units (no separate scoring pass)."""
    if args.plan is not None:
        if any(getattr(args, k) is not None for k in ("hidden_size", "num_attention_heads", "num_query_groups",
                                                      "ffn_hidden_size", "num_layers", "drop_layers", *MOE_FLAGS)):
            raise PruneError("--plan fixes the target shape; do not combine it with target-shape flags")
        if args.method != "auto" or args.scores is not None:
            given = f"--method {args.method}" if args.method != "auto" else f"--scores {args.scores}"
            raise PruneError(f"{given}: --plan fixes the kept units; do not combine it with a selection method or "
                             "scores")
        plan = PrunePlan.load(args.plan)
        if plan.source != src.shape:
            raise PruneError(f"plan {args.plan} was made for another model: {shape_differences(plan.source, src.shape)}"
                             " (the plan's source vs the input)")
        adapter.check_target(src, plan.target, write_options(args))
        reconstruct = args.reconstruct or ("least-squares" if "reconstruct" in plan.info else "none")
        if reconstruct == "least-squares":
            replay_refit_settings(args, plan, args.plan)
        check_reconstruct(src, reconstruct, None, args.calib, refit_options(args), plan.target,
                          scoring_options(args, args.seed, args.scores))
        if reconstruct == "none":  # the plan's record of an earlier refit does not describe these weights
            plan = dataclasses.replace(plan, info={k: v for k, v in plan.info.items() if k != "reconstruct"})
        return plan, reconstruct, None
    auto = args.drop_layers == "auto"
    if auto and args.num_layers is None:
        raise PruneError("--drop-layers auto needs --num-layers N (how many layers to keep)")
    groups = gqa_query_groups(src.shape, args.num_attention_heads, args.num_query_groups, args.gqa)
    req = TargetRequest(args.hidden_size, args.num_attention_heads, groups,
                        args.ffn_hidden_size, args.num_layers, None if auto else args.drop_layers,
                        args.num_experts, args.moe_ffn_hidden_size, args.num_experts_per_tok)
    target, drop = resolve_target(src.shape, req)
    note = top_k_note(src.shape, target) if args.num_experts_per_tok is None else None
    if note:
        print(note)
    tp, ep = args.tp or src.tp, src.ep
    if args.prune_type == "balance":
        check_tp_balance(src.shape, target, tp, ep)  # every refusal comes before the scoring pass
    adapter.check_target(src, target, write_options(args))
    method = args.method
    options = scoring_options(args, args.seed, args.scores)
    if method == "auto":
        method, why = auto_method(src, options)
        if target == src.shape and drop is None:
            method, why = "random", "nothing to prune"  # keep-all: no scores needed
        print(f"--method auto: {method} ({why})")
    reconstruct = args.reconstruct or default_reconstruct(method)
    if target == src.shape and drop is None:
        reconstruct = "none"  # keep-all: the output is the input
    check_reconstruct(src, reconstruct, method, args.calib, refit_options(args), target, options)
    balance = args.prune_type == "balance"
    info = {**method_settings(method, options), **({"requested": "auto"} if args.method == "auto" else {})}
    if method == "activation" and options.scores is None and reconstruct == "least-squares" and drop is None:
        counts = make_plan(src.shape, target, Scores.zeros(src.shape, method), None, tp=tp, balance=balance,
                           info={**info, "selection": "in the refit's pass over the calibration text"}, ep=ep)
        if fusable(counts):
            return (norm_rescale(counts, args.norm_rescale), reconstruct,
                    FusedSelection(options.aggregation, tp if balance else 1))
    scores = SCORERS[method](src, options)
    if auto and scores.layers is None:
        raise PruneError(f"--drop-layers auto needs block-influence scores; --method {method} has none "
                         "(use --method activation)")
    plan = make_plan(src.shape, target, scores, drop, tp=tp, balance=balance, info=info, ep=ep)
    return norm_rescale(plan, args.norm_rescale), reconstruct, None


def check_arguments(args: argparse.Namespace, kind: str) -> None:
    """Refuse flags that cannot apply (none takes 0 to mean its default), before any work."""
    check_at_least("--tp", args.tp, 1)
    check_at_least("--max-shard-size", args.max_shard_size, 1)
    if args.seed is not None and not 0 <= args.seed < 2**64:  # torch's generator takes 64 bits
        raise PruneError(f"--seed {args.seed}: choose a seed in 0..{2**64 - 1}")
    check_calibration_arguments(args, args.input)
    if kind == "hf" and args.ckpt_format is not None:
        raise PruneError(f"--ckpt-format {args.ckpt_format}: the output of an HF input is an HF checkpoint "
                         "(safetensors); the flag is for Megatron inputs (convert the output with `megatron-prune "
                         "convert hf-to-megatron --ckpt-format ...`)")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    args._typed = typed_flags(args)
    folder = open_model(args.input)
    check_arguments(args, folder.kind)
    adapter = ADAPTERS[folder.kind]()
    src = adapter.open(folder.path)
    check_output_path(args.input, args.output, args.overwrite)
    plan, method, select = build_plan(args, src, adapter)
    describe(plan)
    refit = method == "least-squares"  # the refit's scratch folder only when it runs
    with scratch_folder(args.output, "refit") if refit else contextlib.nullcontext() as scratch:
        store = None
        if refit:
            store, summary, plan = reconstruct(src, plan, scoring_options(args, args.seed, args.scores),
                                               refit_options(args), scratch, select)
            if summary is not None:
                print(describe_refit(summary))
        adapter.write(src, plan, args.output, write_options(args), overrides=store)
    s, t = plan.source, plan.target
    print(f"wrote {args.output}: {s.num_params() / 1e6:.1f}M -> {t.num_params() / 1e6:.1f}M parameters "
          f"in {time.time() - t0:.1f}s")
    return 0


def describe(plan: PrunePlan) -> None:
    """Say what was chosen, in a few lines."""
    s, t = plan.source, plan.target
    rows = [("layers", s.num_layers, t.num_layers), ("hidden", s.hidden_size, t.hidden_size),
            ("heads", s.num_attention_heads, t.num_attention_heads),
            ("query groups", s.num_query_groups, t.num_query_groups),
            ("ffn", s.ffn_hidden_size, t.ffn_hidden_size), ("vocab", s.vocab_size, t.vocab_size)]
    if s.is_moe:  # a MoE model has no dense FFN
        rows[4:5] = [("experts", s.num_experts, t.num_experts), ("expert ffn", s.moe_ffn_hidden_size,
                     t.moe_ffn_hidden_size), ("top-k", s.num_experts_per_tok, t.num_experts_per_tok)]
    print("shape: " + ", ".join(f"{n} {a}->{b}" if a != b else f"{n} {a}" for n, a, b in rows))
    kept = {lp.source_layer for lp in plan.layers}
    dropped = [i for i in range(s.num_layers) if i not in kept]
    if dropped:
        print(f"dropped layers ({plan.info.get('layer_rule', 'plan')}): {','.join(map(str, dropped))}")

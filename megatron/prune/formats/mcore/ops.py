"""Operations on Megatron checkpoints, each the application of a plan: convert HF -> Megatron and back (the identity
plan), reshard (the identity plan at another TP/PP or layer spec) and prune (balanced: each TP shard on its own;
unbalanced: whole tensors, any output TP/PP)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from megatron.prune.core.plan import PLAN_FILE, PrunePlan, shape_differences
from megatron.prune.core.shape import ModelShape, hf_config_for_shape, nearest_multiples, not_divisible
from megatron.prune.core.slicing import layer_index, tp_slice_index
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import has_tokenizer_file, open_megatron
from megatron.prune.formats.hf import HFCheckpoint, check_hf_target, write_pruned
from megatron.prune.formats.mcore.args import args_for_shape, config_with_dtype
from megatron.prune.formats.mcore.dist import torch_to_dist
from megatron.prune.formats.mcore.read import CheckpointHeader, MegatronCheckpoint, load_shard
from megatron.prune.formats.mcore.schema import (META_DIR, MOE_SPEC, SPECS, check_ckpt_format, check_ep,
                                                 check_moe_layout, check_tp_pp, padded_vocab_size, tp_units)

from megatron.prune.formats.mcore.write import (Layout, ParamFn, balanced_params, global_params, write_checkpoint,
                                                write_meta)
from megatron.prune.formats.source import (DEFAULT_MAX_SHARD_BYTES, FormatAdapter, TensorOverrides, TensorSource,
                                           WriteOptions)
from megatron.prune.io.atomic import atomic_output, check_output_path

NOT_CARRIED = ("optimizer state and RNG state are not carried over and the iteration is reset to 0: "
               "load it with --finetune (or --no-load-optim --no-load-rng)")


def save(src: TensorSource, plan: PrunePlan, output: Path, tp: int, pp: int, spec: str, divisible_by: int,
         params_fn: Callable[..., ParamFn], base_args: argparse.Namespace | None,
         side_files: Path | None, overwrite: bool, progress: bool, save_plan: bool,
         ckpt_format: str = "torch", overrides: TensorOverrides | None = None, ep: int = 1,
         grouped: bool = False) -> Path:
    """Shared body of convert, reshard and prune: write ``plan`` applied to ``src`` (``overrides`` in place of some
    slices) as a Megatron checkpoint of TP ``tp``, PP ``pp`` and EP ``ep`` (``grouped``: TEGroupedMLP experts)."""
    if spec not in SPECS:
        raise PruneError(f"layer spec {spec!r} unknown; choose one of {', '.join(SPECS)}")
    check_ckpt_format(ckpt_format)
    check_moe_layout(plan.target, spec, ckpt_format, grouped)
    target = plan.target
    check_tp_pp(target, tp, pp, what="output: ")
    check_ep(target, ep, what="output: ")
    layout = Layout(target, tp, pp, spec, padded_vocab_size(target.vocab_size, divisible_by, tp), ep, grouped)
    output = Path(output)
    final = output.resolve()
    tokenizer = final / META_DIR if side_files is not None and has_tokenizer_file(side_files) else None
    args = args_for_shape(base_args, target, tp, pp, layout.padded_vocab, divisible_by, src.dtype, spec,
                          src.hf_config, tokenizer, ep, grouped)
    with atomic_output(output, overwrite) as tmp:
        write_checkpoint(tmp, layout, params_fn(src, plan, layout, overrides), args, src.release, progress)
        write_meta(tmp, side_files, src.hf_config, target)
        if ckpt_format == "torch_dist":
            torch_to_dist(tmp, progress)
        if save_plan:
            plan.save(tmp)
    return output


def hf_to_megatron(hf_dir: Path | str, out_dir: Path | str, tp: int = 1, pp: int = 1, spec: str = "local",
                   make_vocab_size_divisible_by: int = 128, overwrite: bool = False, progress: bool = True,
                   ckpt_format: str = "torch", ep: int = 1, grouped: bool = False) -> Path:
    """Convert an HF LLaMA-family checkpoint into a Megatron-LM checkpoint of TP ``tp``, PP ``pp`` and EP ``ep``
    (``grouped``: a MoE model's experts in TEGroupedMLP's layout, transformer_engine spec)."""
    src = HFCheckpoint.open(hf_dir).in_one_dtype()  # mixed float32/float16/bfloat16 weights: one dtype, no loss
    check_tp_pp(src.shape, tp, pp)
    check_ep(src.shape, ep)
    check_moe_layout(src.shape, spec, ckpt_format, grouped)
    check_output_path(hf_dir, out_dir, overwrite)
    return save(src, PrunePlan.keep_all(src.shape), Path(out_dir), tp, pp, spec, make_vocab_size_divisible_by,
                 global_params, None, Path(hf_dir), overwrite, progress, save_plan=False, ckpt_format=ckpt_format,
                 ep=ep, grouped=grouped)


def reshard(mg_dir: Path | str, out_dir: Path | str, tp: int | None = None, pp: int | None = None,
            spec: str | None = None, make_vocab_size_divisible_by: int | None = None, overwrite: bool = False,
            progress: bool = True, ckpt_format: str = "torch", ep: int | None = None) -> Path:
    """Rewrite a Megatron checkpoint at another TP/PP/EP size (and/or layer spec); weights unchanged. A MoE model's
    expert layout follows the spec (:data:`MOE_SPEC`): ``--transformer-impl local`` turns TEGroupedMLP experts into
    SequentialMLP ones, ``transformer_engine`` the other way."""
    src = open_megatron(mg_dir)
    tp, pp, ep, spec = tp or src.tp, pp or src.pp, ep or src.ep, spec or src.spec
    grouped = src.shape.is_moe and MOE_SPEC[True] == spec
    check_tp_pp(src.shape, tp, pp)
    check_ep(src.shape, ep)
    check_moe_layout(src.shape, spec, ckpt_format, grouped)
    check_output_path(mg_dir, out_dir, overwrite)
    div = make_vocab_size_divisible_by or int(getattr(src.args, "make_vocab_size_divisible_by", 128))
    plan_file = src.folder / PLAN_FILE
    out = save(src, PrunePlan.keep_all(src.shape), Path(out_dir), tp, pp, spec, div, global_params,
               src.args, src.folder / META_DIR, overwrite, progress, save_plan=False, ckpt_format=ckpt_format, ep=ep,
               grouped=grouped)
    if plan_file.is_file():
        shutil.copy2(plan_file, out / PLAN_FILE)  # keep the record of how this checkpoint was pruned
    return out


def megatron_to_hf(mg_dir: Path | str, out_dir: Path | str, overwrite: bool = False, progress: bool = True,
                   max_shard_bytes: int | None = None, iteration: int | None = None) -> Path:
    """Convert a Megatron checkpoint (its ``iteration``, default the latest) back to HF safetensors (vocab
    padding removed, TP/PP gathered)."""
    src = open_megatron(mg_dir, iteration)
    check_hf_target(src.shape, src.hf_config)
    check_output_path(mg_dir, out_dir, overwrite)
    with atomic_output(Path(out_dir), overwrite) as tmp:
        side = src.folder / META_DIR
        if not side.is_dir():  # a checkpoint from elsewhere: config from args, no tokenizer to copy
            side = tmp / ".no-side-files"
            side.mkdir()
        config = config_with_dtype(hf_config_for_shape(src.hf_config, src.shape), src.dtype)
        write_pruned(src, PrunePlan.keep_all(src.shape), tmp, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, progress,
                     hf_config=config, side_files=side)
        if side.parent == tmp:
            side.rmdir()
        (tmp / PLAN_FILE).unlink()  # an identity plan says nothing; keep the source's real plan if any
        if (src.folder / PLAN_FILE).is_file():
            shutil.copy2(src.folder / PLAN_FILE, tmp / PLAN_FILE)
    return Path(out_dir)


def check_balanced(plan: PrunePlan, tp: int, padded: int) -> None:
    """Balanced pruning needs every TP slice of every layer to keep the same number of groups/heads/FFN."""
    units = tp_units(plan.source, padded)
    s, t = plan.source, plan.target
    for lp in plan.layers:
        idx = layer_index(plan, lp)
        for axis, want in (("groups", t.num_query_groups), ("heads", t.num_attention_heads),
                           ("ffn", t.ffn_hidden_size)):
            counts = [len(tp_slice_index(idx, units, tp, r).for_axis(axis)) for r in range(tp)]
            if len(set(counts)) > 1:
                raise PruneError(
                    f"plan is not balanced for TP={tp}: layer {lp.source_layer} keeps {counts} {axis} per TP slice; "
                    f"make the plan with --tp {tp} --prune-type balance, or use --prune-type unbalance")
    for name, n in not_divisible(t, tp)[:1]:
        raise PruneError(f"--{name.replace('_', '-')} {n} is not divisible by the checkpoint's TP size {tp}; "
                         f"valid values near it: {nearest_multiples(n, tp, getattr(s, name))}")


def output_layout(src: CheckpointHeader, target: ModelShape, prune_type: str, tp: int | None,
                  pp: int | None) -> tuple[int, int]:
    """The output TP and PP of pruning ``src`` to ``target``; checked before any selection work is done."""
    pp = pp or src.pp
    if prune_type == "balance":
        if tp not in (None, src.tp):
            raise PruneError(f"--prune-type balance keeps the checkpoint's TP size {src.tp}; got --tp {tp} "
                             "(use --prune-type unbalance to write another TP size)")
        tp = src.tp
    elif prune_type == "unbalance":
        tp = tp or src.tp
    else:
        raise PruneError(f"--prune-type {prune_type!r}: choose balance or unbalance")
    if target.num_layers % pp:
        L = target.num_layers
        valid = [n for n in range(pp, src.shape.num_layers + 1, pp)]
        raise PruneError(f"the pruned model would have {L} layers, not divisible by the checkpoint's pipeline-parallel "
                         f"size {pp}; keep a multiple of {pp} layers ({valid}) or first run "
                         f"`megatron-prune reshard --pp 1`")
    check_tp_pp(target, tp, pp, what="target: ")
    if target.is_moe and target.num_experts % src.ep:  # experts stay split as in the input
        raise PruneError(f"--num-experts {target.num_experts} is not divisible by the checkpoint's expert-parallel "
                         f"size {src.ep}; valid: multiples of {src.ep} up to {src.shape.num_experts}")
    return tp, pp


def apply_plan(src: CheckpointHeader, plan: PrunePlan, output: Path | str, overwrite: bool = False,
               prune_type: str = "balance", tp: int | None = None, pp: int | None = None,
               progress: bool = True, ckpt_format: str = "torch", overrides: TensorOverrides | None = None) -> Path:
    """Apply ``plan`` to an open Megatron checkpoint (torch or torch_dist), ``overrides`` in place of some slices.

    ``balance`` prunes each TP shard on its own (output TP = input TP, one input and one output shard in
    memory at a time); ``unbalance`` gathers each tensor, applies the plan and writes ``tp``/``pp``.
    """
    if plan.source != src.shape:
        raise PruneError(f"plan was made for another model than {src.folder}: "
                         f"{shape_differences(plan.source, src.shape)} (the plan's source vs the input)")
    plan.validate()
    tp, pp = output_layout(src, plan.target, prune_type, tp, pp)
    div = int(getattr(src.args, "make_vocab_size_divisible_by", 128))
    params_fn: Callable[..., ParamFn] = global_params
    if prune_type == "balance":
        check_balanced(plan, tp, src.padded_vocab)
        if isinstance(src, MegatronCheckpoint):  # torch_dist input has no per-rank files: gather, prune, re-split
            params_fn = balanced_params
    check_output_path(src.folder, output, overwrite)
    src.release()
    out = save(src, plan, Path(output), tp, pp, src.spec, div, params_fn, src.args, src.folder / META_DIR,
               overwrite, progress, save_plan=True, ckpt_format=ckpt_format, overrides=overrides,
               ep=src.ep, grouped=src.grouped)  # the expert layout it read
    print(f"note: {NOT_CARRIED}")
    return out


def iter_state_dicts(folder: Path | str) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """(tp_rank, pp_rank), shard dict for every shard of a torch-format checkpoint (for tests and inspection)."""
    ckpt = open_megatron(folder)
    for key in sorted(ckpt.files):
        yield key, load_shard(ckpt.files[key])


def format_adapter() -> FormatAdapter:
    """The ``megatron`` entry of :data:`megatron.prune.formats.ADAPTERS`."""

    def write(src: CheckpointHeader, plan: PrunePlan, output: Path, options: WriteOptions,
              overrides: TensorOverrides | None = None) -> Path:
        return apply_plan(src, plan, output, options.overwrite, options.prune_type, options.tp, options.pp,
                          options.progress, options.ckpt_format, overrides)

    def check_target(src: CheckpointHeader, target: ModelShape, options: WriteOptions) -> None:
        check_ckpt_format(options.ckpt_format)
        output_layout(src, target, options.prune_type, options.tp, options.pp)

    return FormatAdapter("megatron", open_megatron, check_target, write)

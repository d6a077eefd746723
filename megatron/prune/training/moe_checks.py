"""The recovery run's checks that concern mixture-of-experts models, before the stock loop starts: what megatron-core
0.19.2's MoE layer cannot do in this recipe (refused in one line), the checkpoint's experts and expert parallelism
against the flags, and the aux load-balancing loss a MoE run trains with."""

from __future__ import annotations

import argparse
from typing import Any

from megatron.prune.cpu import shims_active
from megatron.prune.errors import PruneError
from megatron.prune.training.model import layer_spec_name


def check_moe_flags_first(ns: argparse.Namespace) -> None:
    """--moe-grouped-gemm on megatron-core's local spec: its MoE builder ignores it and builds SequentialMLP experts
    (grouped GEMM needs Transformer Engine); under --use-checkpoint-args the checkpoint's value replaces it as well.
    Refused rather than ignored (``ns``: ``preflight_flags``)."""
    built = layer_spec_name(argparse.Namespace(transformer_impl=ns.transformer_impl or "transformer_engine"))
    if ns.moe_grouped_gemm and built == "local":
        raise PruneError("--moe-grouped-gemm: megatron-core's local spec (the one this run builds) has no grouped "
                         "GEMM and would build SequentialMLP experts all the same; drop the flag (a checkpoint with "
                         "grouped-GEMM experts converts to SequentialMLP ones: megatron-prune reshard --input CKPT "
                         "--output CKPT-local --transformer-impl local)")


# The load-balancing loss coefficient a MoE run gets when the flags give none (megatron-core's default, 0, turns the
# aux loss off; 1e-2 is the value its help recommends as a start).
MOE_AUX_LOSS_COEFF = 1e-2


# MoE args a checkpoint must agree with (checked where either side is a MoE model).
MOE_MODEL_ARGS: tuple[str, ...] = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
                                   "moe_router_score_function", "moe_shared_expert_intermediate_size")


def set_moe_aux_loss(args: Any, coeff_given: bool) -> None:
    """A MoE run trains with the aux load-balancing loss on: without --moe-aux-loss-coeff it gets
    :data:`MOE_AUX_LOSS_COEFF` (megatron-core's 0 would leave the router unbalanced as it prunes and trains)."""
    if not getattr(args, "num_experts", None) or coeff_given:
        return
    if "aux_loss" in str(getattr(args, "moe_router_load_balancing_type", "")) and not args.moe_aux_loss_coeff:
        args.moe_aux_loss_coeff = MOE_AUX_LOSS_COEFF


def check_moe(args: Any) -> None:
    """What a MoE run cannot do here: Transformer Engine's MoE layers (megatron-prune writes MoE checkpoints in the
    local spec only, and pretrain_llama.py builds MoE layers from megatron-core's local spec only); on CPU the flex
    token dispatcher (DeepEP / HybridEP kernels: an ImportError, or a bare assertion at EP=1, once the model is
    built); and tensor parallelism: megatron-core's MoE layer trains at TP > 1 only with sequence parallelism
    (a ValueError at the first step), which the local spec's RMSNorm does not support."""
    if not getattr(args, "num_experts", None):
        return
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    if tp > 1:
        raise PruneError(f"--tensor-model-parallel-size {tp} with a mixture-of-experts model: megatron-core's MoE "
                         "layer trains at TP > 1 only with --sequence-parallel, which its local spec (RMSNorm) does "
                         "not support; train at TP=1 and split the experts instead: --expert-model-parallel-size N "
                         "(EP=N in check_model.sh) on a checkpoint resharded with megatron-prune reshard --tp 1 --ep N")
    if args.moe_token_dispatcher_type == "flex" and shims_active():
        raise PruneError("--moe-token-dispatcher-type flex: runs on DeepEP or HybridEP kernels, which need a GPU; on "
                         "CPU use allgather or alltoall (--moe-token-dispatcher-type alltoall)")
    if layer_spec_name(args) == "transformer_engine":
        raise PruneError(f"--num-experts {args.num_experts}: pretrain_llama.py builds mixture-of-experts layers from "
                         "megatron-core's local spec only (SequentialMLP experts, as megatron-prune writes them); "
                         "pass --transformer-impl local")


def check_moe_shape(ckpt_args: Any, args: Any, flag: str) -> None:
    """Clear error when a checkpoint's experts disagree with the flags (a dense checkpoint with --num-experts, other
    expert counts or widths, another router); the stock loader would stop on a missing or misshapen tensor, or
    load the router into another top-k. (The stock --use-checkpoint-args loader keeps a --num-experts that a dense
    checkpoint's args leave unset.)"""
    saved, given = getattr(ckpt_args, "num_experts", None), getattr(args, "num_experts", None)
    if not (saved or given):
        return
    if not saved:
        raise PruneError(f"{flag} {args.load}: a dense checkpoint (no experts), but the flags build a "
                         f"mixture-of-experts model (--num-experts {given}); drop --num-experts")
    if not given:
        raise PruneError(f"{flag} {args.load}: a mixture-of-experts checkpoint ({saved} experts), but the flags build "
                         "a dense model; pass --use-checkpoint-args (or its --num-experts, --moe-ffn-hidden-size, "
                         "--moe-router-topk)")
    diffs = [f"{name}: checkpoint {getattr(ckpt_args, name, None)!r} vs flags {getattr(args, name, None)!r}"
             for name in MOE_MODEL_ARGS if getattr(ckpt_args, name, None) != getattr(args, name, None)]
    if diffs:
        raise PruneError(f"{flag} {args.load}: the checkpoint's mixture-of-experts args disagree with the flags ("
                         + "; ".join(diffs) + "). Pass --use-checkpoint-args or fix the flags.")


def check_expert_parallel(ckpt_args: Any, args: Any, flag: str, path: str, torch_dist: bool) -> None:
    """A torch-format MoE checkpoint holds one shard folder per expert-parallel rank (``mp_rank_TT_EEE``) and loads
    only at the EP it was saved with; the stock loader would look for folders that are not there."""
    from megatron.prune.training.checkpoints import saved_expert_parallel

    saved, ep = saved_expert_parallel(ckpt_args), int(getattr(args, "expert_model_parallel_size", 1) or 1)
    if torch_dist or not getattr(ckpt_args, "num_experts", None) or saved == ep:
        return
    raise PruneError(f"{flag} {path}: the checkpoint was saved at expert-parallel size {saved}, the run uses "
                     f"--expert-model-parallel-size {ep}; reshard it: megatron-prune reshard --input {path} --output "
                     f"{str(path).rstrip('/')}-ep{ep} --ep {ep}")

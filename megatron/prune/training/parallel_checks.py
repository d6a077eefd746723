"""The recovery run's checks of its parallel layout, before the stock loop starts: the modes this recipe cannot run,
and a tensor-parallel size that does not split the model's sizes (Megatron finds both out inside every rank)."""

from __future__ import annotations

from typing import Any

from megatron.prune.errors import PruneError
from megatron.prune.training.model import layer_spec_name


def check_parallelism(args: Any) -> None:
    """Parallel modes this recipe cannot run, refused before start-up. Context parallelism would need each rank's
    share of every sequence (get_batch hands every rank whole sequences); sequence parallelism needs TE's RMSNorm
    (megatron-core's local spec uses torch's, which asserts it away only once the model is built)."""
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1:
        raise PruneError(f"--context-parallel-size {cp}: pretrain_llama.py supports only 1 for now; use tensor or "
                         "pipeline parallelism (--tensor-model-parallel-size, --pipeline-model-parallel-size)")
    if getattr(args, "sequence_parallel", False) and layer_spec_name(args) == "local":
        raise PruneError("--sequence-parallel: this run builds megatron-core's local layer spec, whose RMSNorm does "
                         "not support it; use Transformer Engine (installed, with --transformer-impl "
                         "transformer_engine) or drop --sequence-parallel")


def check_tensor_parallel(args: Any) -> None:
    """The model's query groups (heads without GQA), heads and dense FFN width must split evenly over the TP ranks
    (Megatron finds out inside every rank, in a traceback; a pruned checkpoint's sizes are the user's choice)."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    sizes = {"query groups": groups, "attention heads": heads}
    if not getattr(args, "num_experts", None):
        sizes["FFN channels"] = getattr(args, "ffn_hidden_size", None)
    sizes = {name: v for name, v in sizes.items() if isinstance(v, int) and v > 0}
    bad = [f"{v} {name}" for name, v in sizes.items() if v % tp]
    if bad:
        valid = [t for t in range(1, min(sizes.values()) + 1) if all(v % t == 0 for v in sizes.values())]
        where = f" of --load {args.load}" if getattr(args, "load", None) else ""
        raise PruneError(f"--tensor-model-parallel-size {tp} (TP): the model{where} has {', '.join(bad)}, not "
                         f"divisible by it; valid TP sizes: {', '.join(map(str, valid))}")
